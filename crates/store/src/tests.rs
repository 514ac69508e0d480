use super::*;
use std::collections::BTreeMap;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    (dir, s)
}

#[test]
fn ingest_names_blob_by_content_and_dedups() {
    let (_d, s) = store();
    let a = s.ingest_bytes(b"hello").unwrap();
    assert_eq!(a, sha256_hex(b"hello"));
    assert_eq!(s.ingest_bytes(b"hello").unwrap(), a);
    assert_eq!(fs::read(s.blob_path(&a)).unwrap(), b"hello");
    s.verify(&a).unwrap();
}

#[test]
fn corrupt_blob_is_detected_before_use() {
    let (_d, s) = store();
    let a = s.ingest_bytes(b"hello").unwrap();
    let p = s.blob_path(&a);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&p, b"jello").unwrap();
    match s.verify(&a) {
        Err(Error::Corrupt { digest, .. }) => assert_eq!(digest, a),
        r => panic!("expected corruption, got {r:?}"),
    }
}

#[test]
fn missing_blob_is_reported() {
    let (_d, s) = store();
    let a = s.ingest_bytes(b"x").unwrap();
    fs::remove_file(s.blob_path(&a)).unwrap();
    assert!(matches!(s.verify(&a), Err(Error::Missing(_))));
}

#[test]
fn image_records_round_trip_and_bad_blobs_drop_their_images() {
    let (_d, s) = store();
    let blob = s.ingest_bytes(b"disk").unwrap();
    let recipe = sha256_hex(b"recipe");
    let files = BTreeMap::from([("disk".to_string(), blob.clone())]);
    let rec = ImageRecord::new(
        ImageKind::Install,
        Some("htop".into()),
        "debian-12",
        "x86_64",
        None,
        &recipe,
        files,
        BTreeMap::new(),
        4,
    );
    s.insert_image(&rec).unwrap();
    let found = s.find_by_recipe(ImageKind::Install, &recipe).unwrap().unwrap();
    assert_eq!(found, rec);
    assert!(s.find_by_recipe(ImageKind::Launch, &recipe).unwrap().is_none());
    fs::remove_file(s.blob_path(&blob)).unwrap();
    assert!(s.verify_image(&found).is_err());
    assert!(s.find_by_recipe(ImageKind::Install, &recipe).unwrap().is_none());
}

#[test]
fn stale_scratch_dirs_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("tmp/999999999.0.build");
    fs::create_dir_all(&stale).unwrap();
    let _s = Store::open(dir.path()).unwrap();
    assert!(!stale.exists());
}
