//! Pruning superseded images: a long-lived store otherwise keeps every
//! generation of base, install and launch images, one set per change of a
//! recipe's inputs (a new agent, kernel command line, QEMU, package list).

use std::collections::{HashMap, HashSet};

use strata_store::{ImageKind, ImageRecord};

use crate::{Engine, Error};

/// Images younger than this are never pruned: a build may be recording
/// the images above them (the same grace as blob collection).
const PRUNE_GRACE_SECS: i64 = 600;

/// What [`Engine::prune_images`] removed (or, in a dry run, would remove).
#[derive(Debug, Default, serde::Serialize)]
pub struct PruneReport {
    /// The image records removed.
    pub images: Vec<ImageRecord>,
    /// Blobs removed with them (none in a dry run).
    pub removed_blobs: u64,
    /// Bytes of those blobs.
    pub freed_bytes: u64,
}

/// When an image was last used: its recorded use (every use checks the
/// image first, [`strata_store::Store::verify_image`]), else its build.
fn last_used(img: &ImageRecord, image_uses: &HashMap<String, i64>) -> i64 {
    image_uses.get(&img.digest).copied().unwrap_or(img.created).max(img.created)
}

/// The digests of base, install and launch images that are superseded:
/// - a base, when another base (same OS and architecture) was used more
///   recently: the one used last is the current one;
/// - an install or launch image not standing on a current base: a launch
///   builds everything anew on the current base;
/// - of those on a current base, all but the one used last of each kind and
///   package (a new QEMU, a changed package definition, a throwaway build).
///
/// What a session stands on (`in_use`), images younger than the grace
/// period, and everything these and the kept images need always stay.
/// Contexts and paused images are a terminal's settings and a user's work:
/// never pruned here.
fn superseded(
    images: &[ImageRecord],
    image_uses: &HashMap<String, i64>,
    in_use: &HashSet<String>,
    now: i64,
) -> Vec<String> {
    let prunable = |i: &ImageRecord| matches!(i.kind, ImageKind::Base | ImageKind::Install | ImageKind::Launch);
    // The one used last in each group; ties go to the larger digest, so the
    // choice does not depend on the catalog's order.
    let newest_by = |group: &dyn Fn(&ImageRecord) -> Option<String>| {
        let mut newest: HashMap<String, (i64, &str)> = HashMap::new();
        for img in images {
            let Some(key) = group(img) else { continue };
            let used = (last_used(img, image_uses), img.digest.as_str());
            if newest.get(&key).is_none_or(|best| used > *best) {
                newest.insert(key, used);
            }
        }
        newest.into_values().map(|(_, d)| d.to_string()).collect::<HashSet<String>>()
    };
    let platform = |i: &ImageRecord| format!("{}/{}", i.os, i.arch);
    let bases = newest_by(&|i| (i.kind == ImageKind::Base).then(|| platform(i)));
    // A launch image names its base. An install image stands on a base's
    // root file system (it outlives agent changes): it is on a current base
    // when its recipe is the one its packages would have there.
    let rootfs: Vec<&str> = images
        .iter()
        .filter(|i| bases.contains(&i.digest))
        .filter_map(|i| i.files.get("rootfs"))
        .map(String::as_str)
        .collect();
    let on_base = |i: &ImageRecord| match i.kind {
        ImageKind::Install => i.meta.get("debs").is_some_and(|debs| {
            let debs: Vec<String> = debs.split_whitespace().map(String::from).collect();
            rootfs.iter().any(|r| crate::install::install_recipe(r, &debs) == i.recipe)
        }),
        _ => i.meta.get("base").is_some_and(|b| bases.contains(b)),
    };
    let above = newest_by(&|i| {
        (matches!(i.kind, ImageKind::Install | ImageKind::Launch) && on_base(i)).then(|| {
            // A networked launch image is kept beside the plain one.
            let variant = i.meta.get(crate::launch::NETWORKED_META).map_or("", String::as_str);
            format!("{}/{}/{}/{variant}", i.kind, i.package.as_deref().unwrap_or("-"), platform(i))
        })
    });
    // Images within the grace period stay, with what they stand on: a
    // build may be recording the images above them.
    let young: HashSet<String> =
        images.iter().filter(|i| now - i.created <= PRUNE_GRACE_SECS).map(|i| i.digest.clone()).collect();
    let roots = bases.into_iter().chain(above).chain(in_use.iter().cloned()).chain(young);
    let keep: HashSet<&str> = strata_store::closure(images, roots).0.into_iter().map(|i| i.digest.as_str()).collect();
    images.iter().filter(|i| prunable(i) && !keep.contains(i.digest.as_str())).map(|i| i.digest.clone()).collect()
}

impl Engine {
    /// Removes superseded base, install and launch images (see
    /// [`superseded`]) and then the blobs no image references. With
    /// `dry_run`, only reports what it would remove.
    ///
    /// # Errors
    /// If the catalog cannot be read or written.
    pub fn prune_images(&self, dry_run: bool) -> Result<PruneReport, Error> {
        let images = self.store.list_images()?;
        let in_use: HashSet<String> = self.session_images().into_iter().collect();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let gone: HashSet<String> =
            superseded(&images, &self.store.image_last_used()?, &in_use, now).into_iter().collect();
        let mut report = PruneReport::default();
        for img in images.into_iter().filter(|i| gone.contains(&i.digest)) {
            if !dry_run {
                tracing::info!(image = %img.digest, kind = %img.kind, package = img.package.as_deref().unwrap_or("-"), "pruning a superseded image");
                self.store.remove_image(&img.digest)?;
            }
            report.images.push(img);
        }
        if !dry_run {
            (report.removed_blobs, report.freed_bytes) = self.gc()?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// An image record; `on` is the base it stands on, `parent` the image
    /// below it (a launch image's install, a paused image's launch image).
    fn img(
        digest: &str,
        kind: ImageKind,
        package: Option<&str>,
        parent: Option<&str>,
        on: Option<&str>,
        created: i64,
    ) -> ImageRecord {
        let mut files = BTreeMap::from([("main".to_string(), format!("blob-{digest}"))]);
        let mut meta = BTreeMap::new();
        let mut recipe = format!("recipe-{digest}");
        match (kind, on) {
            (ImageKind::Base, _) => {
                files.insert("rootfs".into(), format!("blob-rootfs-{digest}"));
            }
            // An install image records its packages, and its recipe comes from its base's root file system.
            (ImageKind::Install, Some(base)) => {
                let debs = package.unwrap_or("-").to_string();
                recipe = crate::install::install_recipe(&format!("blob-rootfs-{base}"), std::slice::from_ref(&debs));
                meta.insert("debs".to_string(), debs);
            }
            (_, Some(base)) => {
                meta.insert("base".to_string(), base.to_string());
            }
            (_, None) => {}
        }
        ImageRecord {
            digest: digest.into(),
            kind,
            package: package.map(String::from),
            os: "debian-12".into(),
            arch: "x86_64".into(),
            parent: parent.map(String::from),
            recipe,
            files,
            meta,
            size: 1,
            created,
        }
    }

    /// A base with one package's install and launch images on it.
    fn generation(n: u32, package: &str, created: i64) -> Vec<ImageRecord> {
        let (base, inst, launch) = (format!("base{n}"), format!("inst{n}"), format!("launch{n}"));
        vec![
            img(&base, ImageKind::Base, None, None, None, created),
            img(&inst, ImageKind::Install, Some(package), Some(&base), Some(&base), created),
            img(&launch, ImageKind::Launch, Some(package), Some(&inst), Some(&base), created),
        ]
    }

    const NOW: i64 = 100_000;

    fn uses(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
        pairs.iter().map(|(d, t)| (d.to_string(), *t)).collect()
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn an_older_generation_goes_and_the_one_used_last_stays() {
        let old = NOW - 10_000;
        let images = [generation(1, "bc", old), generation(2, "bc", old + 10)].concat();
        let u = uses(&[("base2", old + 50), ("inst2", old + 50), ("launch2", old + 50)]);
        assert_eq!(sorted(superseded(&images, &u, &HashSet::new(), NOW)), ["base1", "inst1", "launch1"]);
        // A store whose recipes went back to the older set (an agent change
        // undone) uses the older images again: the newer set goes.
        let u = uses(&[("base1", old + 90), ("inst1", old + 90), ("launch1", old + 90)]);
        assert_eq!(sorted(superseded(&images, &u, &HashSet::new(), NOW)), ["base2", "inst2", "launch2"]);
    }

    #[test]
    fn a_package_not_launched_since_the_base_changed_goes_with_the_old_base() {
        let old = NOW - 10_000;
        let images = [generation(1, "nano", old), generation(2, "bc", old + 10)].concat();
        assert_eq!(sorted(superseded(&images, &HashMap::new(), &HashSet::new(), NOW)), ["base1", "inst1", "launch1"]);
    }

    #[test]
    fn install_images_outlive_a_new_agent_on_the_same_root_file_system() {
        let old = NOW - 10_000;
        let mut images = generation(1, "bc", old);
        // A new agent: a new base on the same root file system; the install
        // images stay valid, and only the launch image is built anew.
        let mut base2 = img("base2", ImageKind::Base, None, None, None, old + 10);
        base2.files.insert("rootfs".into(), "blob-rootfs-base1".into());
        images.push(base2);
        images.push(img("launch2", ImageKind::Launch, Some("bc"), Some("inst1"), Some("base2"), old + 10));
        // Installed on the old base, never launched since: still current.
        images.push(img("inst-nano", ImageKind::Install, Some("nano"), Some("base1"), Some("base1"), old));
        assert_eq!(sorted(superseded(&images, &HashMap::new(), &HashSet::new(), NOW)), ["base1", "launch1"]);
    }

    #[test]
    fn bases_that_share_every_blob_are_told_apart_by_their_own_use() {
        // A new kernel command line makes a new base from the very same
        // blobs; the one launches used last is the current one.
        let old = NOW - 10_000;
        let mut images = [generation(1, "bc", old), generation(2, "bc", old + 10)].concat();
        let files = images[0].files.clone();
        images[3].files = files;
        let u = uses(&[("base1", old + 90), ("inst1", old + 90), ("launch1", old + 90), ("base2", old + 50)]);
        assert_eq!(sorted(superseded(&images, &u, &HashSet::new(), NOW)), ["base2", "inst2", "launch2"]);
        // A build not used since counts from its build: newer than the rest.
        // inst1 stays: it stands on the root file system base2 has too.
        let u = uses(&[("base1", old + 5), ("inst1", old + 5), ("launch1", old + 5)]);
        assert_eq!(sorted(superseded(&images, &u, &HashSet::new(), NOW)), ["base1", "launch1"]);
    }

    #[test]
    fn a_young_image_keeps_what_it_stands_on() {
        let old = NOW - 10_000;
        let mut images = [generation(1, "bc", old), generation(2, "bc", old + 10)].concat();
        // Being built on the older base right now (another strata build).
        images.push(img("launch1-new", ImageKind::Launch, Some("nano"), Some("inst1"), Some("base1"), NOW - 5));
        assert_eq!(superseded(&images, &HashMap::new(), &HashSet::new(), NOW), ["launch1"]);
    }

    #[test]
    fn sessions_keep_what_they_stand_on() {
        let old = NOW - 10_000;
        let mut images = [generation(1, "bc", old), generation(2, "bc", old + 10)].concat();
        images.push(img("paused1", ImageKind::Paused, Some("bc"), Some("launch1"), Some("base1"), old));
        let in_use = HashSet::from(["paused1".to_string()]);
        assert!(superseded(&images, &HashMap::new(), &in_use, NOW).is_empty());
    }

    #[test]
    fn one_of_each_package_stays_and_recent_builds_are_spared() {
        let old = NOW - 10_000;
        let mut images = generation(1, "bc", old);
        images.extend([
            img("inst-py", ImageKind::Install, Some("python3"), Some("base1"), Some("base1"), old),
            img("inst-py-new", ImageKind::Install, Some("python3"), Some("base1"), Some("base1"), NOW - 5),
            img("launch1-new", ImageKind::Launch, Some("bc"), Some("inst1"), Some("base1"), old + 5),
            img("ctx", ImageKind::Context, None, None, None, old),
            img("ctx2", ImageKind::Context, None, None, None, old + 1),
        ]);
        // Superseded by newer builds (a new QEMU makes a new launch image on
        // the same install); contexts are never pruned.
        assert_eq!(sorted(superseded(&images, &HashMap::new(), &HashSet::new(), NOW)), ["inst-py", "launch1"]);
        // When the older one was used last, the newer build is spared while
        // it is within the grace period (its launch image may be on the way).
        let u = uses(&[("inst-py", NOW - 1)]);
        assert_eq!(superseded(&images, &u, &HashSet::new(), NOW), ["launch1"]);
    }
}
