//! Weight files: effdet `state_dict` tensors stored as safetensors (f32, f16 or bf16), read into
//! host tensors with strict key and shape checking.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::compute::Tensor;
use crate::error::{Error, Result};

/// Tensors that carry bookkeeping, not weights; present in every effdet `state_dict`, ignored.
const IGNORED_SUFFIXES: [&str; 1] = [".num_batches_tracked"];

/// `(key, shape)` pairs in the order a model requested them.
type Schema = Vec<(String, Vec<usize>)>;

/// The tensors of one weights file, converted to f32, with a record of which keys the model
/// consumed so leftovers can be reported.
pub struct WeightStore {
    path: PathBuf,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    taken: RefCell<BTreeSet<String>>,
    /// The file's `__metadata__` (string pairs), e.g. `effdet.image_size` written by training.
    metadata: BTreeMap<String, String>,
    /// Schema discovery ([`WeightStore::recording`]): every request is answered with zeros and
    /// recorded, in request order.
    recorded: Option<RefCell<Schema>>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn to_f32(key: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let words = |n: usize| bytes.chunks_exact(n);
    Ok(match dtype {
        Dtype::F32 => words(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => words(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => words(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::UnsupportedDtype {
                key: key.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    })
}

impl WeightStore {
    /// Reads a safetensors file. Errors name the file and say whether it is missing, unreadable,
    /// truncated or not safetensors at all.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses safetensors bytes (`path` is only used in messages).
    pub fn from_bytes(path: impl AsRef<Path>, bytes: &[u8]) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::WeightsFormat {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let metadata = SafeTensors::read_metadata(bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        let mut tensors = BTreeMap::new();
        for (key, view) in st.tensors() {
            if IGNORED_SUFFIXES.iter().any(|s| key.ends_with(s)) {
                continue;
            }
            let data = to_f32(&key, view.dtype(), view.data())?;
            tensors.insert(key, (view.shape().to_vec(), data));
        }
        if tensors.is_empty() {
            return Err(Error::WeightsFormat {
                path,
                reason: "the file holds no weight tensors".into(),
            });
        }
        Ok(WeightStore {
            path,
            tensors,
            taken: RefCell::new(BTreeSet::new()),
            metadata,
            recorded: None,
        })
    }

    /// The file's string metadata (`__metadata__`); `effdet.image_size` and `effdet.labels`
    /// are read by [`crate::Detector`].
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of weight tensors (bookkeeping tensors excluded).
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of weight values (effdet counts 3,880,067 parameters for D0; this also
    /// counts BN running statistics).
    pub fn num_values(&self) -> usize {
        self.tensors.values().map(|(_, d)| d.len()).sum()
    }

    /// Every tensor's key and shape, in key order.
    pub fn names(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.tensors
            .iter()
            .map(|(k, (shape, _))| (k.as_str(), shape.as_slice()))
    }

    /// A store over tensors already in memory (e.g. weights being trained); `name` is used in
    /// messages in place of a file path.
    pub fn from_tensors(name: impl Into<PathBuf>, tensors: &BTreeMap<String, Tensor>) -> Self {
        WeightStore {
            path: name.into(),
            tensors: tensors
                .iter()
                .filter(|(k, _)| !IGNORED_SUFFIXES.iter().any(|s| k.ends_with(s)))
                .map(|(k, t)| (k.clone(), (t.shape().to_vec(), t.data().to_vec())))
                .collect(),
            taken: RefCell::new(BTreeSet::new()),
            metadata: BTreeMap::new(),
            recorded: None,
        }
    }

    /// A store that holds nothing but answers every [`WeightStore::take`] with zeros of the
    /// requested shape and records the request: loading a model from it lists the model's
    /// tensors ([`WeightStore::recorded`]), e.g. to initialise a network from scratch.
    pub fn recording() -> Self {
        WeightStore {
            path: PathBuf::from("<schema>"),
            tensors: BTreeMap::new(),
            taken: RefCell::new(BTreeSet::new()),
            metadata: BTreeMap::new(),
            recorded: Some(RefCell::new(Vec::new())),
        }
    }

    /// The `(key, shape)` requests a recording store received, in order (empty otherwise).
    pub fn recorded(&self) -> Vec<(String, Vec<usize>)> {
        self.recorded
            .as_ref()
            .map(|r| r.borrow().clone())
            .unwrap_or_default()
    }

    /// The tensor `key`, which must have exactly `shape`. Marks it as used.
    pub fn take(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(rec) = &self.recorded {
            rec.borrow_mut().push((key.to_string(), shape.to_vec()));
            return Ok(Tensor::zeros(shape.to_vec()));
        }
        let (actual, data) = self.tensors.get(key).ok_or_else(|| Error::MissingTensor {
            key: key.to_string(),
            expected: shape.to_vec(),
        })?;
        if actual != shape {
            return Err(Error::ShapeMismatch {
                key: key.to_string(),
                expected: shape.to_vec(),
                actual: actual.clone(),
            });
        }
        self.taken.borrow_mut().insert(key.to_string());
        Tensor::new(actual.clone(), data.clone())
    }

    /// Errors if any tensor was never taken: the file is for a different model.
    pub fn check_all_used(&self) -> Result<()> {
        let taken = self.taken.borrow();
        let unused: Vec<_> = self
            .tensors
            .iter()
            .filter(|(k, _)| !taken.contains(*k))
            .collect();
        match unused.first() {
            None => Ok(()),
            Some((k, (shape, _))) => Err(Error::UnexpectedTensors {
                count: unused.len(),
                first: (*k).clone(),
                shape: shape.clone(),
            }),
        }
    }
}
