//! Choosing the accelerator: forced by configuration, else a cached verdict
//! of really booting the base image's kernel under KVM.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use strata_store::ImageRecord;
use strata_vmm::Accel;

use crate::base::file_identity;
use crate::{Engine, Error};

/// How long a probe guest may take under KVM before KVM is judged broken.
const PROBE_LIMIT: Duration = Duration::from_secs(15);

#[derive(Serialize, Deserialize)]
struct Verdict {
    key: String,
    accel: Accel,
}

/// Identity of the QEMU binary (its launch images are only valid with it).
pub fn qemu_identity() -> String {
    let path = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(strata_vmm::qemu::QEMU)).find(|p| p.is_file()));
    path.map(|p| file_identity(&p)).unwrap_or_default()
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

impl Engine {
    /// The accelerator for VMs of this base image.
    ///
    /// # Errors
    /// If the probe cannot run QEMU at all.
    pub async fn accel_for(&self, base: &ImageRecord) -> Result<Accel, Error> {
        if let Some(a) = self.cfg.accel {
            return Ok(a);
        }
        let key = format!("{}|{}|{}", qemu_identity(), host_kernel(), base.file("kernel")?);
        let cache = self.cfg.state_dir.join("accel.json");
        if let Some(v) = std::fs::read(&cache).ok().and_then(|b| serde_json::from_slice::<Verdict>(&b).ok()) {
            if v.key == key {
                return Ok(v.accel);
            }
        }
        let kernel = self.store.blob_path(base.file("kernel")?);
        let initramfs = self.store.blob_path(base.file("initramfs")?);
        tracing::info!("probing KVM by booting a probe guest (up to {} s)", PROBE_LIMIT.as_secs());
        // The probe runs confined like every VM: ids of its own, claimed
        // for a work directory that lives as long as the probe.
        let work = self.store.work_dir("kvm-probe")?;
        let identity = match self.identity_for(Accel::Kvm)? {
            Some(spec) => {
                let name = work.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                Some(spec.identities.claim(&name, spec.groups).map_err(|e| Error::Refused(e.to_string()))?)
            }
            None => None,
        };
        let credentials = identity.as_ref().map(strata_vmm::credentials_of);
        let boots = strata_vmm::accel::kvm_boots(&kernel, &initramfs, PROBE_LIMIT, credentials).await?;
        drop((identity, work));
        let accel = if boots { Accel::Kvm } else { Accel::Tcg };
        tracing::info!(%accel, "accelerator chosen");
        crate::write_atomic(&cache, &serde_json::to_vec(&Verdict { key, accel }).expect("serializes"))?;
        Ok(accel)
    }
}
