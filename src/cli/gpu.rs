//! GPU memory readings through NVML (`nvml-wrapper`, which loads libnvidia-ml at run time):
//! on a machine without it every reading is `None` and [`GpuMem::note`] says why.

use nvml_wrapper::Nvml;

/// An NVML handle for one GPU, or the reason there is none.
pub struct GpuMem {
    nvml: Option<Nvml>,
    index: u32,
    note: String,
}

impl GpuMem {
    /// Opens NVML and checks that GPU `index` answers.
    pub fn open(index: u32) -> Self {
        match Nvml::init() {
            Err(e) => GpuMem {
                nvml: None,
                index,
                note: format!("NVML absent: {e}"),
            },
            Ok(nvml) => match nvml.device_by_index(index).and_then(|d| d.name()) {
                Ok(name) => GpuMem {
                    nvml: Some(nvml),
                    index,
                    note: format!("GPU {index}: {name}"),
                },
                Err(e) => GpuMem {
                    nvml: None,
                    index,
                    note: format!("no GPU {index} ({e})"),
                },
            },
        }
    }

    /// True when readings are available.
    pub fn available(&self) -> bool {
        self.nvml.is_some()
    }

    /// What is being measured, or why nothing is.
    pub fn note(&self) -> &str {
        &self.note
    }

    /// Device memory in use now (all processes), in bytes.
    pub fn used_bytes(&self) -> Option<u64> {
        let nvml = self.nvml.as_ref()?;
        let d = nvml.device_by_index(self.index).ok()?;
        d.memory_info().ok().map(|m| m.used)
    }
}
