//! The control plane's Prometheus metrics: where launches went and how they
//! ended, how long they took, and the cluster as etcd holds it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlacedLabels {
    pub server: String,
    /// `launched`, `refused` (the server answered with an error) or
    /// `unreachable` (it failed mid-request; the launch went elsewhere).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PackageLabels {
    pub package: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// One control plane's metrics; every series names the plane.
pub struct Metrics {
    pub placed: Family<PlacedLabels, Counter>,
    pub launch_seconds: Family<PackageLabels, Histogram>,
    servers: Gauge,
    sessions: Family<StateLabels, Gauge>,
    leader: Gauge,
    registry: Registry,
}

impl Metrics {
    pub fn new(plane: &str) -> Metrics {
        let placed = Family::<PlacedLabels, Counter>::default();
        let launch_seconds = Family::<PackageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0])
        });
        let (servers, sessions, leader) = (Gauge::default(), Family::<StateLabels, Gauge>::default(), Gauge::default());
        let label = [(std::borrow::Cow::Borrowed("plane"), std::borrow::Cow::Owned(plane.to_string()))];
        let mut registry = Registry::with_prefix_and_labels("strata_control", label.into_iter());
        registry.register("placements", "Launch orders by server and outcome", placed.clone());
        registry.register(
            "launch_seconds",
            "Launch request to the server's answer, retries included",
            launch_seconds.clone(),
        );
        registry.register("servers", "Servers registered (lease alive)", servers.clone());
        registry.register("sessions", "Sessions recorded in etcd, by state", sessions.clone());
        registry.register("leader", "1 if this plane leads", leader.clone());
        Metrics { placed, launch_seconds, servers, sessions, leader, registry }
    }

    /// Renders the exposition text with the cluster's gauges set.
    pub fn render(&self, servers: i64, sessions: &[(String, i64)], leader: bool) -> String {
        self.servers.set(servers);
        for (state, n) in sessions {
            self.sessions.get_or_create(&StateLabels { state: state.clone() }).set(*n);
        }
        self.leader.set(i64::from(leader));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("text encoding");
        out
    }

    pub fn count(&self, server: &str, outcome: &str) {
        self.placed.get_or_create(&PlacedLabels { server: server.into(), outcome: outcome.into() }).inc();
    }
}
