use super::*;

/// A server: id, free/total memory (MiB), committed (MiB), load1 on 4 CPUs,
/// cached image digests.
fn srv(id: &str, free: u64, committed: u64, load1: f64, cached: &[&str]) -> ServerLoad {
    ServerLoad {
        id: id.into(),
        healthy: true,
        sessions: (committed / 512) as u32,
        cpus: 4,
        load1,
        memory_total_mib: 16384,
        memory_free_mib: free,
        memory_committed_mib: committed,
        cached_images: cached.iter().map(|s| s.to_string()).collect(),
        address: String::new(),
    }
}

fn down(mut s: ServerLoad) -> ServerLoad {
    s.healthy = false;
    s
}

fn req(mib: u64, images: &[&str]) -> Request {
    Request { memory_mib: mib, images: images.iter().map(|s| s.to_string()).collect() }
}

struct Case {
    name: &'static str,
    servers: Vec<ServerLoad>,
    request: Request,
    rule: &'static str,
    overcommit: f64,
    /// The chosen server's id, or a part of the error.
    want: Result<&'static str, &'static str>,
}

#[test]
fn the_table_of_servers_and_expected_choices() {
    let img = ["base", "install", "launch"];
    let cases = vec![
        Case {
            name: "locality beats free memory",
            servers: vec![srv("a", 15000, 0, 0.0, &[]), srv("b", 8000, 4096, 1.0, &img)],
            request: req(512, &img),
            rule: "least-loaded",
            overcommit: 1.0,
            want: Ok("b"),
        },
        Case {
            name: "partial locality still counts",
            servers: vec![srv("a", 12000, 0, 0.0, &["base"]), srv("b", 12000, 0, 0.0, &["base", "install"])],
            request: req(512, &img),
            rule: "least-loaded",
            overcommit: 1.0,
            want: Ok("b"),
        },
        Case {
            name: "same images: more free memory wins",
            servers: vec![srv("a", 4000, 8192, 0.5, &img), srv("b", 12000, 2048, 0.5, &img)],
            request: req(512, &img),
            rule: "least-loaded",
            overcommit: 1.0,
            want: Ok("b"),
        },
        Case {
            name: "same memory: less load wins",
            servers: vec![srv("a", 8000, 4096, 7.0, &[]), srv("b", 8000, 4096, 1.0, &[])],
            request: req(512, &[]),
            rule: "least-loaded",
            overcommit: 1.0,
            want: Ok("b"),
        },
        Case {
            name: "admission control: a full server is skipped however local",
            servers: vec![srv("a", 8000, 16000, 0.0, &img), srv("b", 8000, 1024, 3.0, &[])],
            request: req(512, &img),
            rule: "least-loaded",
            overcommit: 1.0,
            want: Ok("b"),
        },
        Case {
            name: "overcommit lets the local server take it",
            servers: vec![srv("a", 8000, 16000, 0.0, &img), srv("b", 8000, 1024, 3.0, &[])],
            request: req(512, &img),
            rule: "least-loaded",
            overcommit: 1.5,
            want: Ok("a"),
        },
        Case {
            name: "a silent server is never chosen",
            servers: vec![down(srv("a", 16000, 0, 0.0, &img)), srv("b", 2000, 8192, 3.0, &[])],
            request: req(512, &img),
            rule: "least-loaded",
            overcommit: 1.0,
            want: Ok("b"),
        },
        Case {
            name: "not enough free memory anywhere",
            servers: vec![srv("a", 256, 0, 0.0, &[]), srv("b", 100, 0, 0.0, &[])],
            request: req(512, &[]),
            rule: "sample-2",
            overcommit: 1.0,
            want: Err("full"),
        },
        Case {
            name: "nobody reporting",
            servers: vec![down(srv("a", 16000, 0, 0.0, &[]))],
            request: req(512, &[]),
            rule: "sample-2",
            overcommit: 1.0,
            want: Err("reporting"),
        },
        Case {
            name: "no servers at all",
            servers: vec![],
            request: req(512, &[]),
            rule: "round-robin",
            overcommit: 1.0,
            want: Err("registered"),
        },
        Case {
            name: "sample-2 with two eligible servers sees both",
            servers: vec![
                srv("a", 8000, 0, 0.0, &[]),
                down(srv("x", 16000, 0, 0.0, &img)),
                srv("b", 8000, 0, 0.0, &img),
            ],
            request: req(512, &img),
            rule: "sample-2",
            overcommit: 1.0,
            want: Ok("b"),
        },
        Case {
            name: "round-robin starts with the first eligible",
            servers: vec![
                down(srv("a", 8000, 0, 0.0, &[])),
                srv("b", 8000, 0, 0.0, &[]),
                srv("c", 16000, 0, 0.0, &img),
            ],
            request: req(512, &img),
            rule: "round-robin",
            overcommit: 1.0,
            want: Ok("b"),
        },
    ];
    for c in cases {
        let policy = Policy::new(c.rule.parse().unwrap(), c.overcommit).unwrap();
        let got = Placer::new(policy, 7).choose(&c.servers, &c.request);
        match (got, c.want) {
            (Ok(i), Ok(id)) => assert_eq!(c.servers[i].id, id, "{}", c.name),
            (Err(e), Err(part)) => assert!(e.to_string().contains(part), "{}: {e}", c.name),
            (got, want) => panic!("{}: got {got:?}, want {want:?}", c.name),
        }
    }
}

#[test]
fn round_robin_takes_turns_and_sampling_beats_chance() {
    let servers = vec![srv("a", 8000, 0, 0.0, &[]), srv("b", 8000, 0, 0.0, &[]), srv("c", 8000, 0, 0.0, &[])];
    let mut rr = Placer::new(Policy::new(RuleKind::RoundRobin, 1.0).unwrap(), 1);
    let turns: Vec<usize> = (0..6).map(|_| rr.choose(&servers, &req(512, &[])).unwrap()).collect();
    assert_eq!(turns, vec![0, 1, 2, 0, 1, 2]);

    // 1000 servers with scattered load: two choices land far better than one.
    let mut rng = SmallRng::seed_from_u64(3);
    let fleet: Vec<ServerLoad> = (0..1000)
        .map(|i| srv(&format!("s{i}"), rng.random_range(1000..16000), 0, rng.random_range(0.0..8.0), &[]))
        .collect();
    let r = req(512, &[]);
    let mean = fleet.iter().map(|s| score(s, &r)).sum::<f64>() / fleet.len() as f64;
    let mut p = Placer::new(Policy::default(), 5);
    let picked = (0..2000).map(|_| score(&fleet[p.choose(&fleet, &r).unwrap()], &r)).sum::<f64>() / 2000.0;
    assert!(picked > mean + 0.1, "sample-2 averages {picked:.3}, chance {mean:.3}");
}

#[test]
fn rules_and_ratios_are_validated() {
    assert_eq!("sample-3".parse::<RuleKind>(), Ok(RuleKind::Sample(3)));
    assert!(matches!("fastest".parse::<RuleKind>(), Err(Error::UnknownRule(_))));
    assert!(Policy::new(RuleKind::LeastLoaded, 0.0).is_err());
    assert!(Policy::new(RuleKind::LeastLoaded, 100.0).is_err());
}
