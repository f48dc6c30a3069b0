//! Device choice: CPU by default, CUDA behind the `cuda` feature.

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which implementation computes a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// The native engine on the CPU (when it supports the model), candle's on CUDA. The
    /// default.
    #[default]
    Auto,
    /// The native CPU engine: plain buffers, fused per layer, SIMD kernels chosen at run
    /// time (AVX-512 or AVX2 on x86-64), the file's own quantized weights for generation.
    Native,
    /// candle's models (`quantized_llama`, `BertModel`) on the CPU or CUDA: the reference the
    /// native engine is tested against.
    Candle,
}

impl Engine {
    /// The engine a model runs on, on `device` (never `Auto`): `Auto` takes the native
    /// engine on the CPU unless `unsupported` says why it cannot run this model, candle's
    /// otherwise; asking for the native one where it cannot run is an error saying why.
    pub(crate) fn resolve(
        self,
        device: &Device,
        unsupported: Option<&'static str>,
    ) -> Result<Self> {
        match (self, device, unsupported) {
            (Engine::Candle, ..) => Ok(Engine::Candle),
            (_, Device::Cpu, None) => Ok(Engine::Native),
            (Engine::Auto, ..) => Ok(Engine::Candle),
            (Engine::Native, Device::Cpu, Some(why)) => Err(Error::NotImplemented(why)),
            (Engine::Native, ..) => Err(Error::Config(
                "the native engine runs on the CPU only: use Engine::Candle for CUDA".into(),
            )),
        }
    }
}

/// Where models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// The CPU (pure-Rust kernels).
    #[default]
    Cpu,
    /// CUDA device `n` (needs the `cuda` feature and a GPU).
    Cuda(usize),
    /// CUDA device 0 when the `cuda` feature is built and a GPU is present, else the CPU.
    Auto,
}

impl DeviceChoice {
    /// The candle device; CUDA without the feature or without a GPU is an error naming why.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => cuda(n),
            DeviceChoice::Auto => Ok(cuda(0).unwrap_or(Device::Cpu)),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda(n: usize) -> Result<Device> {
    Device::new_cuda(n).map_err(|e| Error::Config(format!("CUDA device {n}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_n: usize) -> Result<Device> {
    Err(Error::NotImplemented(
        "CUDA: this build has no `cuda` feature (build soma-inference with --features cuda)",
    ))
}

/// Threads the CPU kernels use. candle sizes its process-wide compute pools once, from
/// `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`, else the physical cores), so the count is
/// set in the environment before the first model runs.
pub fn cpu_threads() -> usize {
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    var("CANDLE_NUM_THREADS")
        .or_else(|| var("RAYON_NUM_THREADS"))
        .unwrap_or_else(candle_core::utils::get_num_threads)
}

/// Checks a configured thread count against the one in effect.
pub(crate) fn check_threads(wanted: Option<usize>) -> Result<()> {
    match wanted {
        Some(n) if n != cpu_threads() => Err(Error::Config(format!(
            "{n} CPU threads asked for but {} are in effect: the count is process-wide; set CANDLE_NUM_THREADS={n} and RAYON_NUM_THREADS={n} before starting",
            cpu_threads()
        ))),
        _ => Ok(()),
    }
}

/// The compute pool of a model pool, shared by its replicas: candle's element-wise CPU
/// kernels parallelise with rayon, and a call from outside a rayon pool is handed to a pool
/// thread and waited for (two context switches per operation, hundreds per token). Running a
/// replica's work inside the pool makes those calls run on the calling worker.
pub(crate) fn replica_pool(name: &str) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(cpu_threads())
        .thread_name({
            let name = name.to_string();
            move |i| format!("soma-{name}-{i}")
        })
        .build()
        .map_err(|e| Error::Config(format!("compute threads for the {name} pool: {e}")))
}

/// Checks the environment variables the pool reads: `SOMA_INFERENCE_ISA` must be
/// `portable`, `avx2` or `avx512vnni` if set (an unknown value is an error naming it, not
/// silently the default).
pub fn check_environment() -> Result<()> {
    match std::env::var("SOMA_INFERENCE_ISA") {
        Err(std::env::VarError::NotPresent) => Ok(()),
        Ok(v) if matches!(v.as_str(), "" | "portable" | "avx2" | "avx512vnni") => Ok(()),
        Ok(v) => Err(Error::Config(format!(
            "SOMA_INFERENCE_ISA={v:?}: expected portable, avx2 or avx512vnni"
        ))),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::Config(
            "SOMA_INFERENCE_ISA is not valid UTF-8".into(),
        )),
    }
}

/// Durations as whole milliseconds in configuration files.
pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
