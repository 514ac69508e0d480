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

#[test]
fn an_image_needs_its_parent_and_base_but_an_install_image_only_its_base() {
    use std::collections::BTreeMap;
    let rec = |kind, parent: Option<&str>, base: Option<&str>| {
        let meta: BTreeMap<String, String> = base.map(|b| ("base".to_string(), b.to_string())).into_iter().collect();
        ImageRecord::new(kind, None, "debian-12", "x86_64", parent.map(String::from), "r", BTreeMap::new(), meta, 0)
    };
    assert_eq!(rec(ImageKind::Install, Some("oldbase"), None).needs(), Vec::<&str>::new());
    assert_eq!(rec(ImageKind::Launch, Some("install"), Some("base")).needs(), vec!["install", "base"]);
    assert_eq!(rec(ImageKind::Paused, Some("launch"), Some("base")).needs(), vec!["launch", "base"]);
    assert_eq!(rec(ImageKind::Base, None, None).needs(), Vec::<&str>::new());
}
