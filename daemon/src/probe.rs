//! The capability probe: what this machine offers, advertised under `capabilities`.

use serde_json::{Map, Value, json};

/// Probes OS, CPU, memory and NVIDIA GPUs. Never fails: a missing part is simply absent
/// (no libnvidia-ml is normal and gives `gpus: []`).
pub fn capabilities() -> Map<String, Value> {
    let mut caps = Map::new();
    caps.insert("os".into(), json!(std::env::consts::OS));
    caps.insert("arch".into(), json!(std::env::consts::ARCH));
    caps.insert("arw_version".into(), json!(env!("CARGO_PKG_VERSION")));
    match sysinfo::System::new() {
        Ok(mut sys) => {
            sys.refresh_cpu_all();
            sys.refresh_memory();
            let model = sys.cpus().first().map(|c| c.brand().trim().to_owned()).unwrap_or_default();
            let logical = sys.cpus().len();
            let cores = sysinfo::System::physical_core_count().unwrap_or(logical);
            caps.insert(
                "cpu".into(),
                json!({ "cores": cores, "threads": logical, "model": model }),
            );
            caps.insert("memory".into(), json!({ "total_bytes": sys.total_memory() }));
        }
        Err(e) => tracing::debug!(error = %e, "system information unavailable"),
    }
    caps.insert("gpus".into(), Value::Array(gpus()));
    caps
}

/// NVIDIA GPUs through NVML, loaded at run time.
pub fn gpus() -> Vec<Value> {
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(nvml) => nvml,
        Err(e) => {
            tracing::debug!(error = %e, "NVML unavailable; reporting no GPUs");
            return Vec::new();
        }
    };
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| {
            let device = nvml.device_by_index(i).ok()?;
            let memory = device.memory_info().ok().map(|m| m.total);
            Some(json!({
                "index": i,
                "name": device.name().unwrap_or_default(),
                "uuid": device.uuid().unwrap_or_default(),
                "memory_total_bytes": memory,
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_reports_the_basics() {
        let caps = super::capabilities();
        assert_eq!(caps["os"], std::env::consts::OS);
        assert_eq!(caps["arch"], std::env::consts::ARCH);
        assert!(caps["gpus"].is_array());
        assert!(caps["cpu"]["cores"].as_u64().unwrap_or(0) >= 1, "{caps:?}");
        assert!(caps["memory"]["total_bytes"].as_u64().unwrap_or(0) > 0, "{caps:?}");
    }
}
