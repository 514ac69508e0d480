//! The shared image store against a real Garage (an S3-compatible object
//! store), started by this test binary and stopped with it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use strata_remote::{Error, Remote};
use strata_store::{ImageKind, ImageRecord, Store};

#[path = "garage/mod.rs"]
mod garage;
use garage::{e2e, garage};

/// A fresh local store (a server's cache) and a client of the shared store.
fn server(name: &str, limit: u64) -> (Arc<Store>, Remote, tempfile::TempDir) {
    let g = garage();
    let dir = tempfile::Builder::new().prefix(&format!("strata-remote-{name}-")).tempdir_in(&g.dir).unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let mut cfg = g.cfg.clone();
    cfg.cache_limit = limit;
    let remote = Remote::new(cfg, store.clone()).unwrap();
    (store, remote, dir)
}

/// Bytes with runs of zeros (holes when fetched) and a marker.
fn blob_bytes(marker: u8, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate().take(len / 3) {
        *b = (i as u8).wrapping_mul(31) ^ marker;
    }
    v[len - 1] = marker;
    v
}

fn image(store: &Store, blobs: &[Vec<u8>], recipe_seed: &str) -> ImageRecord {
    let files: BTreeMap<String, String> =
        blobs.iter().enumerate().map(|(i, b)| (format!("part{i}"), store.ingest_bytes(b).unwrap())).collect();
    let recipe = strata_store::sha256_hex(recipe_seed.as_bytes());
    let rec = ImageRecord::new(
        ImageKind::Install,
        Some("test".into()),
        "debian-12",
        "x86_64",
        None,
        &recipe,
        files,
        BTreeMap::new(),
        0,
    );
    store.insert_image(&rec).unwrap();
    rec
}

fn unique(label: &str) -> String {
    format!("{label}-{}-{:?}", std::process::id(), std::time::SystemTime::now())
}

#[tokio::test]
async fn an_image_published_by_one_server_is_fetched_by_another_once_and_checked() {
    if !e2e() {
        return;
    }
    let (a, remote_a, _da) = server("a", u64::MAX);
    let blobs = [blob_bytes(1, 3 << 20), blob_bytes(2, 100_000)];
    let rec = image(&a, &blobs, &unique("published"));
    remote_a.publish(&rec).await.unwrap();
    // Publishing again uploads nothing new and changes nothing.
    remote_a.publish(&rec).await.unwrap();

    let (b, remote_b, _db) = server("b", u64::MAX);
    assert!(b.image(&rec.digest).unwrap().is_none());
    let found = remote_b.find_by_recipe(ImageKind::Install, &rec.recipe).await.unwrap().expect("found by recipe");
    assert_eq!(found, rec);
    // Many launches want it at once: each blob is downloaded once.
    let remote_b = Arc::new(remote_b);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (r, rec) = (remote_b.clone(), found.clone());
            tokio::spawn(async move { r.fetch(&rec).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(remote_b.downloads(), 2, "blobs downloaded more than once");
    assert_eq!(b.image(&rec.digest).unwrap().as_ref(), Some(&rec));
    for (d, bytes) in rec.files.values().zip(&blobs) {
        b.verify_full(d).unwrap();
        assert_eq!(&std::fs::read(b.blob_path(d)).unwrap(), bytes);
    }
    // Zeros arrive as holes: the big blob takes less disk than its length.
    use std::os::unix::fs::MetadataExt;
    let big = std::fs::metadata(b.blob_path(&rec.files["part0"])).unwrap();
    assert!(big.blocks() * 512 < big.len() / 2, "{} bytes allocated for {}", big.blocks() * 512, big.len());
    // Nothing is found for a recipe nobody published.
    let none = strata_store::sha256_hex(unique("never").as_bytes());
    assert!(remote_b.find_by_recipe(ImageKind::Install, &none).await.unwrap().is_none());
}

#[tokio::test]
async fn a_missing_or_corrupt_blob_fails_clearly_and_caches_nothing() {
    if !e2e() {
        return;
    }
    let (a, remote_a, _da) = server("c", u64::MAX);
    let good = blob_bytes(3, 50_000);
    let rec = image(&a, std::slice::from_ref(&good), &unique("corrupt"));
    remote_a.publish(&rec).await.unwrap();
    let digest = rec.files["part0"].clone();
    // Someone damages the object in the store.
    let objects = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&garage().cfg.endpoint)
        .with_bucket_name(&garage().cfg.bucket)
        .with_region(&garage().cfg.region)
        .with_access_key_id(&garage().cfg.access_key_id)
        .with_secret_access_key(&garage().cfg.secret_access_key)
        .with_allow_http(true)
        .build()
        .unwrap();
    use object_store::ObjectStore;
    let key = object_store::path::Path::from(format!("blobs/sha256/{digest}"));
    objects.put(&key, b"not what it should be".to_vec().into()).await.unwrap();

    let (b, remote_b, db) = server("d", u64::MAX);
    let err = remote_b.fetch(&rec).await.unwrap_err();
    assert!(matches!(err, Error::CorruptBlob { .. }), "{err}");
    assert!(err.to_string().contains("corrupt") && err.to_string().contains(&digest), "{err}");
    assert!(!b.blob_path(&digest).exists(), "a corrupt blob entered the cache");
    assert!(b.image(&rec.digest).unwrap().is_none());
    let leftovers: Vec<_> = std::fs::read_dir(db.path().join("tmp")).unwrap().flatten().collect();
    assert!(leftovers.is_empty(), "half-written files left: {leftovers:?}");

    // Gone from the store altogether.
    objects.delete(&key).await.unwrap();
    let err = remote_b.fetch(&rec).await.unwrap_err();
    assert!(matches!(err, Error::MissingBlob(_)), "{err}");
    assert!(!b.blob_path(&digest).exists());
}

#[tokio::test]
async fn the_local_cache_evicts_shared_blobs_least_recently_used_first() {
    if !e2e() {
        return;
    }
    // Room for two blobs of 1 MiB, not three.
    let (c, remote, _dc) = server("e", (2 << 20) + (1 << 19));
    let seed = unique("lru");
    let blobs: Vec<Vec<u8>> = (0..3u8).map(|i| blob_bytes(10 + i, 1 << 20)).collect();
    let recs: Vec<ImageRecord> =
        blobs.iter().enumerate().map(|(i, b)| image(&c, std::slice::from_ref(b), &format!("{seed}-{i}"))).collect();
    let local_only = image(&c, &[blob_bytes(20, 1 << 20)], &format!("{seed}-local"));
    for r in &recs {
        remote.publish(r).await.unwrap();
    }
    // Used in the order 1, 0, 2 (a second apart: uses are kept to the second).
    for i in [1usize, 0, 2] {
        c.verify(&recs[i].files["part0"]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let keep = HashSet::from([recs[1].files["part0"].clone()]);
    let evicted = remote.evict(&keep).await.unwrap();
    // Over the limit by two blobs: the oldest use that may go (0), then 2;
    // 1 is kept for a running session, and the unpublished one never goes.
    assert_eq!(evicted.blobs, 2, "{evicted:?}");
    assert!(!c.blob_path(&recs[0].files["part0"]).exists());
    assert!(!c.blob_path(&recs[2].files["part0"]).exists());
    assert!(c.blob_path(&recs[1].files["part0"]).exists());
    assert!(c.blob_path(&local_only.files["part0"]).exists());
    assert!(c.image(&recs[0].digest).unwrap().is_none(), "an image without its blob is still recorded");
    // Wanted again: fetched back.
    remote.fetch(&recs[0]).await.unwrap();
    c.verify_full(&recs[0].files["part0"]).unwrap();
}
