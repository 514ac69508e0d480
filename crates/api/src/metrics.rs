//! Prometheus metrics.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use strata_engine::Engine;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaunchLabels {
    pub package: String,
    /// `pool` (restored ahead), `launch_image` or `cold`.
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PackageLabels {
    pub package: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// The server's metrics.
pub struct Metrics {
    pub launch_seconds: Family<LaunchLabels, Histogram>,
    sessions: Family<StateLabels, Gauge>,
    image_hits: Family<KindLabels, Gauge>,
    image_misses: Family<KindLabels, Gauge>,
    image_builds: Family<KindLabels, Gauge>,
    image_build_failures: Family<KindLabels, Gauge>,
    pool: Family<PackageLabels, Gauge>,
    registry: Registry,
}

impl Metrics {
    /// Metrics labelled with this machine's host name.
    pub fn new() -> Metrics {
        Metrics::for_server(strata_engine::host::host_name())
    }

    /// Metrics whose every series names `server` (in a cluster: its id,
    /// since several servers may share a host).
    pub fn for_server(server: String) -> Metrics {
        let launch_seconds = Family::<LaunchLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0])
        });
        let sessions = Family::<StateLabels, Gauge>::default();
        let image_hits = Family::<KindLabels, Gauge>::default();
        let image_misses = Family::<KindLabels, Gauge>::default();
        let image_builds = Family::<KindLabels, Gauge>::default();
        let image_build_failures = Family::<KindLabels, Gauge>::default();
        let pool = Family::<PackageLabels, Gauge>::default();
        // Every series names the server it comes from, for a fleet's dashboards.
        let server = [(std::borrow::Cow::Borrowed("server"), std::borrow::Cow::Owned(server))];
        let mut registry = Registry::with_prefix_and_labels("strata", server.into_iter());
        registry.register("launch_seconds", "Launch request to a running session", launch_seconds.clone());
        registry.register("sessions", "Sessions by state", sessions.clone());
        registry.register("image_cache_hits", "Image lookups that found a usable image", image_hits.clone());
        registry.register(
            "image_cache_misses",
            "Image lookups that found none usable (a build follows)",
            image_misses.clone(),
        );
        registry.register("image_builds", "Images built", image_builds.clone());
        registry.register("image_build_failures", "Image builds that failed", image_build_failures.clone());
        registry.register("pool_sessions", "Sessions restored ahead of demand, waiting", pool.clone());
        Metrics {
            launch_seconds,
            sessions,
            image_hits,
            image_misses,
            image_builds,
            image_build_failures,
            pool,
            registry,
        }
    }

    /// Renders the exposition text, refreshing the gauges first.
    pub fn render(&self, engine: &Engine, states: &[(String, i64)], pool: &[(String, i64)]) -> String {
        for (package, n) in pool {
            self.pool.get_or_create(&PackageLabels { package: package.clone() }).set(*n);
        }
        for (state, n) in states {
            self.sessions.get_or_create(&StateLabels { state: state.clone() }).set(*n);
        }
        for kind in strata_store::ImageKind::ALL {
            let i = strata_engine::kind_index(kind);
            let k = KindLabels { kind: kind.to_string() };
            self.image_hits.get_or_create(&k).set(engine.stats.hits[i].load(Ordering::Relaxed) as i64);
            self.image_misses.get_or_create(&k).set(engine.stats.misses[i].load(Ordering::Relaxed) as i64);
            self.image_builds.get_or_create(&k).set(engine.stats.builds[i].load(Ordering::Relaxed) as i64);
            self.image_build_failures
                .get_or_create(&k)
                .set(engine.stats.build_failures[i].load(Ordering::Relaxed) as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("text encoding");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
