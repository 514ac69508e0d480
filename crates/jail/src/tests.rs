use super::*;

/// /proc/self/cgroup and mountinfo as on the hosts CI runs on: v1
/// hierarchies for the controllers, a unified one without any.
const HYBRID_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/15f7\n2:cpuacct:/\n1:cpu:/\n0::/\n";
const HYBRID_MOUNTS: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

/// Debian 12's default: the unified hierarchy only.
const V2_CGROUP: &str = "0::/system.slice/strata.service\n";
const V2_MOUNTS: &str = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

#[test]
fn v1_hierarchies_are_used_where_they_hold_the_controllers() {
    let layout = find_layout(HYBRID_CGROUP, HYBRID_MOUNTS, |_| String::new()).unwrap();
    assert_eq!(
        layout,
        Layout::Split {
            cpu: "/sys/fs/cgroup/cpu".into(),
            memory: "/sys/fs/cgroup/memory/process_api/15f7".into(),
            pids: "/sys/fs/cgroup/pids".into(),
        }
    );
    // cpu and cpuacct mounted together, as many distributions do.
    let joint = HYBRID_MOUNTS.replace("rw,cpu\n", "rw,cpu,cpuacct\n");
    let layout = find_layout(&HYBRID_CGROUP.replace("1:cpu:/", "1:cpu,cpuacct:/x"), &joint, |_| String::new());
    assert!(matches!(layout, Ok(Layout::Split { cpu, .. }) if cpu == Path::new("/sys/fs/cgroup/cpu/x")));
}

#[test]
fn v2_is_used_when_its_cgroup_has_the_controllers_and_refused_clearly_otherwise() {
    let full = |_: &Path| "cpuset cpu io memory hugetlb pids rdma misc".to_string();
    let layout = find_layout(V2_CGROUP, V2_MOUNTS, full).unwrap();
    assert_eq!(layout, Layout::Unified("/sys/fs/cgroup/system.slice/strata.service".into()));
    let err = find_layout(V2_CGROUP, V2_MOUNTS, |_| "cpu io".to_string()).unwrap_err().to_string();
    assert!(err.contains("memory, pids") && err.contains("Delegate=yes"), "{err}");
    // A hybrid host whose v1 hierarchies lack pids, and whose unified one has nothing.
    let no_pids = HYBRID_MOUNTS.replace("rw,pids\n", "rw,devices\n");
    let err = find_layout(HYBRID_CGROUP, &no_pids, |_| String::new()).unwrap_err().to_string();
    assert!(err.contains("lacks"), "{err}");
    let err = find_layout("", "", |_| String::new()).unwrap_err().to_string();
    assert!(err.contains("mounted"), "{err}");
}

#[test]
fn a_mount_of_a_subtree_and_escaped_paths_are_followed() {
    let mounts = "30 23 0:26 /system.slice /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw\n";
    let all = |_: &Path| "cpu memory pids".to_string();
    let layout = find_layout(V2_CGROUP, mounts, all).unwrap();
    assert_eq!(layout, Layout::Unified("/sys/fs/cgroup x/strata.service".into()));
}

fn fake(unified: bool) -> (tempfile::TempDir, Cgroups) {
    let t = tempfile::tempdir().unwrap();
    let layout = if unified {
        fs::create_dir(t.path().join("u")).unwrap();
        Layout::Unified(t.path().join("u"))
    } else {
        for d in ["cpu", "memory", "pids"] {
            fs::create_dir(t.path().join(d)).unwrap();
        }
        Layout::Split { cpu: t.path().join("cpu"), memory: t.path().join("memory"), pids: t.path().join("pids") }
    };
    (t, Cgroups { layout, owner: "ab12".into() })
}

const LIMITS: Limits = Limits { cpu_percent: 50, memory_bytes: 768 << 20, pids: 256 };

fn read(p: PathBuf) -> String {
    fs::read_to_string(p).unwrap()
}

#[test]
fn a_vm_cgroup_carries_its_limits_in_each_layout() {
    let (t, cgs) = fake(false);
    let cg = cgs.create("0123456789ab", &LIMITS).unwrap();
    let name = "strata-ab12-0123456789ab";
    assert_eq!(read(t.path().join("cpu").join(name).join("cpu.cfs_quota_us")), "50000");
    assert_eq!(read(t.path().join("cpu").join(name).join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(t.path().join("memory").join(name).join("memory.limit_in_bytes")), (768u64 << 20).to_string());
    assert_eq!(read(t.path().join("pids").join(name).join("pids.max")), "256");
    assert_eq!(cg.procs_files().len(), 3);

    let (t, cgs) = fake(true);
    cgs.create("0123456789ab", &LIMITS).unwrap();
    let d = t.path().join("u").join(name);
    assert_eq!(read(d.join("cpu.max")), "50000 100000");
    assert_eq!(read(d.join("memory.max")), (768u64 << 20).to_string());
    assert_eq!(read(d.join("memory.oom.group")), "1");
    assert_eq!(read(d.join("pids.max")), "256");
}

#[test]
fn names_that_are_not_one_path_component_are_refused() {
    let (_t, cgs) = fake(true);
    for bad in ["", "../x", "a/b", ".hidden"] {
        assert!(cgs.create(bad, &LIMITS).is_err(), "{bad:?}");
    }
}

#[test]
fn sweeping_removes_empty_cgroups_of_gone_vms_and_others_abandoned() {
    let (t, cgs) = fake(false);
    // Real cgroup directories can be removed with their control files in
    // them; these fakes cannot, so each is left as an empty directory.
    let bare = |vm: &str| {
        for h in ["cpu", "memory", "pids"] {
            fs::create_dir_all(t.path().join(h).join(format!("strata-ab12-{vm}"))).unwrap();
        }
    };
    bare("gone1");
    bare("live1");
    // Another store's: one just made (its VM may be joining it), one
    // untouched for two hours (its strata was killed).
    fs::create_dir_all(t.path().join("cpu").join("strata-other-young")).unwrap();
    let old = t.path().join("cpu").join("strata-other-abandoned");
    fs::create_dir_all(&old).unwrap();
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    fs::File::open(&old).unwrap().set_modified(two_hours_ago).unwrap();
    fs::create_dir_all(t.path().join("cpu").join("not-strata")).unwrap();
    let removed = cgs.sweep(|vm| vm == "live1");
    assert_eq!(removed, 2);
    assert!(!t.path().join("memory/strata-ab12-gone1").exists());
    assert!(t.path().join("memory/strata-ab12-live1").exists());
    assert!(t.path().join("cpu/strata-other-young").exists(), "another store's new cgroup was swept");
    assert!(!old.exists(), "another store's abandoned cgroup was kept");
    assert!(t.path().join("cpu/not-strata").exists());
}
