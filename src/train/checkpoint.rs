//! Checkpoints: one safetensors file holding the model (parameters and BN statistics), the EMA,
//! the optimizer state and the run's progress and settings (as safetensors metadata), written
//! atomically so a crash or a full disk never destroys the previous checkpoint.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use crate::compute::Tensor;
use crate::error::{Error, Result};

/// Identifies our checkpoint files.
pub const FORMAT: &str = "effdet-rs checkpoint v1";

/// Tensors plus string metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    /// The tensors under `prefix` (e.g. `model.`), with the prefix removed.
    pub fn section(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
            .collect()
    }

    /// Serialises to safetensors bytes (f32 tensors, metadata in the header).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut meta = self.metadata.clone();
        meta.insert("format".into(), FORMAT.into());
        crate::train::optim::serialize_tensors_with(&self.tensors, meta, false)
    }

    /// Reads a checkpoint; errors name the file and say what is wrong with it.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::WeightsFormat {
            path: path.to_path_buf(),
            reason,
        };
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        if metadata.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!(
                "not an effdet-rs training checkpoint (format {:?}, expected {FORMAT:?})",
                metadata.get("format")
            )));
        }
        let tensors = crate::train::optim::deserialize_tensors(path, &bytes)?;
        Ok(Checkpoint { tensors, metadata })
    }

    /// Writes the checkpoint atomically: to a temporary file in the same directory, flushed and
    /// synced, then renamed over `path`. On any error (disk full included) the temporary file is
    /// removed and an existing `path` is untouched.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomic(path.as_ref(), &self.to_bytes()?)
    }
}

/// The temporary file [`write_atomic`] uses for `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes `bytes` to `path` through a temporary file and a rename (see [`Checkpoint::save`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.flush()?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Write {
            path: path.to_path_buf(),
            source: e,
        });
    }
    Ok(())
}
