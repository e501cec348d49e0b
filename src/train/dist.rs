//! Data-parallel training's seam: the [`Communicator`] trait (all-reduce, broadcast, barrier),
//! an in-process implementation for ranks running as threads ([`ThreadGroup`]), the single-rank
//! [`SingleProcess`], torch `DistributedSampler`-exact data sharding ([`shard_indices`]) and the
//! launcher environment ([`LaunchEnv`]: torchrun, Slurm, Open MPI).
//!
//! Data parallelism here is DDP's: every rank holds the full model, computes gradients on its
//! own shard of the batch, [`average_gradients`] all-reduces them (sum / world size, DDP's
//! default), and every rank then takes the identical optimizer step. Rank 0's initial weights
//! are broadcast first ([`broadcast_params`]), as DDP does when it wraps a model.
//!
//! Adding NCCL later: an `NcclComm` (cudarc's `nccl::safe::Comm::from_rank(device, rank, world,
//! id)`) implements [`Communicator`] the same way; rank 0 creates the NCCL unique id and shares
//! it through a TCP rendezvous at [`LaunchEnv::rendezvous`] (`MASTER_ADDR:MASTER_PORT`). The
//! trait works on host slices, which is what CPU ranks and the tests need; the CUDA engine adds
//! device-buffer variants of the same three collectives alongside (so gradients never leave the
//! GPU) and keeps these host versions for small values (loss, found-inf flags). Everything
//! above the trait (sharding, gradient averaging, the training loop) is unchanged.
//!
//! Only one GPU exists on the test host and NCCL refuses two ranks on one GPU, so multi-rank
//! logic is tested with [`ThreadGroup`] ranks on the CPU.

#![warn(missing_docs)]

use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::compute::Tensor;
use crate::train::optim::Param;

/// Everything that can go wrong in distributed setup or a collective.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launcher variable holds a value that cannot be used.
    #[error("launch environment: {var}={value:?}: {reason}")]
    EnvValue {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Launcher variables are missing or contradict each other.
    #[error("launch environment: {0}")]
    Env(String),
    /// Another rank left the group (its communicator was dropped, e.g. its thread panicked);
    /// every later collective fails the same way.
    #[error("rank {rank}: the process group is broken: {reason}")]
    GroupBroken {
        /// The rank reporting it.
        rank: usize,
        /// Which rank left.
        reason: String,
    },
    /// Ranks passed buffers of different lengths to the same collective.
    #[error("{op}: ranks passed buffers of different lengths {lens:?} (index = rank)")]
    LengthMismatch {
        /// The collective.
        op: &'static str,
        /// Each rank's length.
        lens: Vec<usize>,
    },
    /// A rank index outside the group.
    #[error("{op}: rank {rank} is outside a group of {world}")]
    InvalidRank {
        /// The operation.
        op: &'static str,
        /// The offending rank.
        rank: usize,
        /// The group size.
        world: usize,
    },
    /// Ranks disagree about something they must agree on (e.g. which parameters have
    /// gradients).
    #[error("ranks disagree: {0}")]
    Mismatch(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, DistError>;

/// Collective communication among the ranks of one training job.
///
/// Every rank must call the same collectives in the same order with equal-length buffers
/// (implementations detect length mismatches where they can). Results are bit-identical on all
/// ranks.
pub trait Communicator: Send {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `data` on every rank by the element-wise sum over ranks.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()>;
    /// Replaces `data` on every rank by the element-wise mean over ranks (sum, then each element
    /// divided by the world size; for power-of-two worlds this equals DDP's divide-then-sum bit
    /// for bit).
    fn all_reduce_mean(&mut self, data: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(data)?;
        let w = self.world_size() as f32;
        if w != 1.0 {
            for x in data.iter_mut() {
                *x /= w;
            }
        }
        Ok(())
    }
    /// Replaces `data` on every rank by the element-wise f64 sum over ranks (for statistics
    /// such as synchronised batch norm's, where f32 rounding of the partial sums is visible in
    /// small, ill-conditioned layers). The default rounds each value to f32 and uses
    /// [`Communicator::all_reduce_sum`]; implementations with an f64 collective (NCCL's
    /// `ncclFloat64`, the thread group) override it with an exact rank-order sum.
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> Result<()> {
        let mut buf: Vec<f32> = data.iter().map(|&v| v as f32).collect();
        self.all_reduce_sum(&mut buf)?;
        for (d, b) in data.iter_mut().zip(buf) {
            *d = b as f64;
        }
        Ok(())
    }
    /// Copies `data` of rank `root` into `data` on every rank.
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
}

/// The communicator of a job with one rank: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _data: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&mut self, _data: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _data: &mut [f32], root: usize) -> Result<()> {
        if root != 0 {
            return Err(DistError::InvalidRank {
                op: "broadcast",
                rank: root,
                world: 1,
            });
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Ranks as threads
// ------------------------------------------------------------------------------------------------

struct SyncState {
    arrived: usize,
    generation: u64,
    broken: Option<String>,
}

struct Shared {
    world: usize,
    sync: Mutex<SyncState>,
    cv: Condvar,
    /// Each rank's contribution to the current collective.
    inputs: Vec<RwLock<Vec<f32>>>,
    /// Each rank's reduced chunk of the current all-reduce.
    outputs: Vec<RwLock<Vec<f32>>>,
}

/// Creates the communicators of ranks that run as threads of one process.
#[derive(Debug)]
pub struct ThreadGroup;

impl ThreadGroup {
    /// One [`ThreadComm`] per rank (`0..world_size`), to be moved into one thread each. Empty
    /// when `world_size` is 0.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world_size: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            world: world_size,
            sync: Mutex::new(SyncState {
                arrived: 0,
                generation: 0,
                broken: None,
            }),
            cv: Condvar::new(),
            inputs: (0..world_size).map(|_| RwLock::new(Vec::new())).collect(),
            outputs: (0..world_size).map(|_| RwLock::new(Vec::new())).collect(),
        });
        (0..world_size)
            .map(|rank| ThreadComm {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }
}

/// One rank of a [`ThreadGroup`].
///
/// All-reduce is a reduce-scatter then all-gather through shared memory: after a barrier each
/// rank sums one contiguous chunk over all ranks *in rank order* (`((x0 + x1) + x2) + ...`, f32),
/// after a second barrier every rank copies all chunks. So every rank gets bit-identical results
/// regardless of thread timing, equal to a sequential rank-order sum, and the work is split
/// across ranks. If a rank's communicator is dropped (its thread finished early or panicked),
/// ranks waiting for it get [`DistError::GroupBroken`] instead of hanging.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadComm")
            .field("rank", &self.rank)
            .field("world_size", &self.shared.world)
            .finish()
    }
}

/// The half-open range of elements rank `r` reduces when `n` are split over `world` ranks.
fn chunk(n: usize, world: usize, r: usize) -> std::ops::Range<usize> {
    let bound = |k: usize| ((n as u128 * k as u128) / world as u128) as usize;
    bound(r)..bound(r + 1)
}

impl ThreadComm {
    fn broken(&self, reason: impl Into<String>) -> DistError {
        DistError::GroupBroken {
            rank: self.rank,
            reason: reason.into(),
        }
    }

    fn lock_sync(&self) -> Result<MutexGuard<'_, SyncState>> {
        self.shared
            .sync
            .lock()
            .map_err(|_| self.broken("a rank panicked inside a collective"))
    }

    fn read<'a>(&self, l: &'a RwLock<Vec<f32>>) -> Result<RwLockReadGuard<'a, Vec<f32>>> {
        l.read()
            .map_err(|_| self.broken("a rank panicked inside a collective"))
    }

    fn write<'a>(&self, l: &'a RwLock<Vec<f32>>) -> Result<RwLockWriteGuard<'a, Vec<f32>>> {
        l.write()
            .map_err(|_| self.broken("a rank panicked inside a collective"))
    }

    /// A reusable barrier with a generation counter; fails if the group is broken before every
    /// rank arrived.
    fn wait(&self) -> Result<()> {
        let mut st = self.lock_sync()?;
        if let Some(reason) = &st.broken {
            return Err(self.broken(reason.clone()));
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation = st.generation.wrapping_add(1);
            self.shared.cv.notify_all();
            return Ok(());
        }
        while st.generation == generation && st.broken.is_none() {
            st = self
                .shared
                .cv
                .wait(st)
                .map_err(|_| self.broken("a rank panicked inside a collective"))?;
        }
        if st.generation != generation {
            Ok(())
        } else {
            let reason = st.broken.clone().unwrap_or_default();
            Err(self.broken(reason))
        }
    }

    /// Every rank's input length (call between the barriers that bracket the inputs).
    fn input_lens(&self) -> Result<Vec<usize>> {
        self.shared
            .inputs
            .iter()
            .map(|l| self.read(l).map(|v| v.len()))
            .collect()
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        // Poisoning only means another rank panicked; the flag must be set either way.
        let mut st = match self.shared.sync.lock() {
            Ok(st) => st,
            Err(poisoned) => poisoned.into_inner(),
        };
        if st.broken.is_none() {
            st.broken = Some(format!(
                "rank {} left the group (its communicator was dropped)",
                self.rank
            ));
        }
        self.shared.cv.notify_all();
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        let world = self.shared.world;
        if world == 1 {
            return Ok(());
        }
        {
            let mut input = self.write(&self.shared.inputs[self.rank])?;
            input.clear();
            input.extend_from_slice(data);
        }
        self.wait()?;
        // Every rank sees the same lengths here (inputs change only after the next barrier).
        let lens = self.input_lens()?;
        if lens.iter().any(|&l| l != data.len()) {
            self.wait()?;
            return Err(DistError::LengthMismatch {
                op: "all_reduce",
                lens,
            });
        }
        {
            let range = chunk(data.len(), world, self.rank);
            let inputs = self
                .shared
                .inputs
                .iter()
                .map(|l| self.read(l))
                .collect::<Result<Vec<_>>>()?;
            let mut out = self.write(&self.shared.outputs[self.rank])?;
            out.clear();
            out.extend_from_slice(&inputs[0][range.clone()]);
            for input in &inputs[1..] {
                for (o, &x) in out.iter_mut().zip(&input[range.clone()]) {
                    *o += x;
                }
            }
        }
        self.wait()?;
        // Outputs are rewritten only after the next collective's first barrier, which this rank
        // reaches after copying; inputs were last read before the barrier above.
        for r in 0..world {
            let range = chunk(data.len(), world, r);
            data[range].copy_from_slice(&self.read(&self.shared.outputs[r])?);
        }
        Ok(())
    }

    /// An all-gather of the f64 values (carried bit-exactly as pairs of f32 bit patterns), then
    /// every rank sums all ranks' values in rank order in f64: identical results everywhere.
    /// Meant for short vectors (statistics), so the gather costs `world` times the data.
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> Result<()> {
        let world = self.shared.world;
        if world == 1 {
            return Ok(());
        }
        {
            let mut input = self.write(&self.shared.inputs[self.rank])?;
            input.clear();
            for v in data.iter() {
                let bits = v.to_bits();
                input.push(f32::from_bits((bits >> 32) as u32));
                input.push(f32::from_bits(bits as u32));
            }
        }
        self.wait()?;
        let lens = self.input_lens()?;
        let result = if lens.iter().any(|&l| l != 2 * data.len()) {
            Err(DistError::LengthMismatch {
                op: "all_reduce_f64",
                lens: lens.iter().map(|l| l / 2).collect(),
            })
        } else {
            let inputs = self
                .shared
                .inputs
                .iter()
                .map(|l| self.read(l))
                .collect::<Result<Vec<_>>>()?;
            let decode = |buf: &[f32], i: usize| {
                f64::from_bits(
                    ((buf[2 * i].to_bits() as u64) << 32) | buf[2 * i + 1].to_bits() as u64,
                )
            };
            for (i, d) in data.iter_mut().enumerate() {
                let mut acc = decode(&inputs[0], i);
                for input in &inputs[1..] {
                    acc += decode(input, i);
                }
                *d = acc;
            }
            Ok(())
        };
        // Nobody may overwrite an input before everyone has read it.
        self.wait()?;
        result
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        let world = self.shared.world;
        if root >= world {
            return Err(DistError::InvalidRank {
                op: "broadcast",
                rank: root,
                world,
            });
        }
        if world == 1 {
            return Ok(());
        }
        {
            let mut input = self.write(&self.shared.inputs[self.rank])?;
            input.clear();
            input.extend_from_slice(data);
        }
        self.wait()?;
        let lens = self.input_lens()?;
        let result = if lens.iter().any(|&l| l != data.len()) {
            Err(DistError::LengthMismatch {
                op: "broadcast",
                lens,
            })
        } else {
            if self.rank != root {
                data.copy_from_slice(&self.read(&self.shared.inputs[root])?);
            }
            Ok(())
        };
        // Nobody may overwrite the root's input before everyone has read it.
        self.wait()?;
        result
    }

    fn barrier(&mut self) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        self.wait()
    }
}

// ------------------------------------------------------------------------------------------------
// Gradient averaging and parameter broadcast (DDP)
// ------------------------------------------------------------------------------------------------

/// Averages the gradients of `params` over all ranks in one all-reduce (DDP's default: the mean).
///
/// Parameters are taken in order; every rank must pass the same parameter list. A parameter
/// without gradient on every rank stays without; one with a gradient on some ranks only is an
/// error on every rank (DDP refuses unused parameters unless told otherwise).
pub fn average_gradients(comm: &mut dyn Communicator, params: &mut [Param]) -> Result<()> {
    let world = comm.world_size();
    if world <= 1 {
        return Ok(());
    }
    let n_params = params.len();
    let n_values: usize = params.iter().map(|p| p.value.len()).sum();
    let mut buf = Vec::with_capacity(n_params + n_values);
    buf.extend(
        params
            .iter()
            .map(|p| if p.grad.is_some() { 1.0f32 } else { 0.0 }),
    );
    for p in params.iter() {
        match &p.grad {
            Some(g) if g.len() == p.value.len() => buf.extend_from_slice(g.data()),
            Some(g) => {
                return Err(DistError::Mismatch(format!(
                    "gradient of `{}` has {} values, the parameter {}",
                    p.name,
                    g.len(),
                    p.value.len()
                )));
            }
            None => buf.resize(buf.len() + p.value.len(), 0.0),
        }
    }
    comm.all_reduce_sum(&mut buf)?;
    let (flags, values) = buf.split_at(n_params);
    if let Some((p, &count)) = params
        .iter()
        .zip(flags)
        .find(|(_, c)| **c != 0.0 && **c != world as f32)
    {
        return Err(DistError::Mismatch(format!(
            "parameter `{}` has a gradient on {count} of {world} ranks",
            p.name
        )));
    }
    let w = world as f32;
    let mut offset = 0;
    for (p, &count) in params.iter_mut().zip(flags) {
        let n = p.value.len();
        if count != 0.0 {
            let mean: Vec<f32> = values[offset..offset + n].iter().map(|&x| x / w).collect();
            // Same element count as the value, so the shape fits.
            let mut g = Tensor::zeros(p.value.shape().to_vec());
            g.data_mut().copy_from_slice(&mean);
            p.grad = Some(g);
        }
        offset += n;
    }
    Ok(())
}

/// Overwrites every parameter value with rank `root`'s (DDP's initial broadcast), one
/// collective for all of them.
pub fn broadcast_params(
    comm: &mut dyn Communicator,
    params: &mut [Param],
    root: usize,
) -> Result<()> {
    if comm.world_size() <= 1 {
        return comm.broadcast(&mut [], root);
    }
    let mut buf: Vec<f32> = params
        .iter()
        .flat_map(|p| p.value.data().iter().copied())
        .collect();
    comm.broadcast(&mut buf, root)?;
    let mut offset = 0;
    for p in params.iter_mut() {
        let n = p.value.len();
        p.value.data_mut().copy_from_slice(&buf[offset..offset + n]);
        offset += n;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Sharding (torch DistributedSampler)
// ------------------------------------------------------------------------------------------------

/// The 32-bit Mersenne Twister exactly as torch's CPU generator (`at::mt19937`) runs it.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    /// torch's `Generator().manual_seed(seed)`: the low 32 bits seed the standard MT init.
    fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }
}

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on the CPU: a
/// Fisher-Yates pass drawing `random() % (n - i)` for position `i`. (For `n >= 2^32 / 20` torch
/// switches to 64-bit draws; that path is implemented as documented in torch but not checked
/// against it.)
pub fn torch_randperm(n: usize, seed: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = Mt19937::new(seed);
    let small = (n as u64) < u64::from(u32::MAX / 20);
    for i in 0..n.saturating_sub(1) {
        let span = (n - i) as u64;
        let z = if small {
            u64::from(rng.next_u32()) % span
        } else {
            rng.next_u64() % span
        };
        perm.swap(i, i + z as usize);
    }
    perm
}

/// The dataset indices rank `rank` of `world` visits in `epoch`, exactly as
/// `torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle,
/// seed=seed, drop_last=False)` after `set_epoch(epoch)` yields them.
///
/// The order is `randperm(n_items)` seeded with `seed + epoch` (or `0..n_items` unshuffled),
/// padded to a multiple of `world` by repeating it from the start, then rank `r` takes positions
/// `r, r + world, ...`. Every rank gets `ceil(n_items / world)` indices; over all ranks every
/// index appears once per epoch plus the padding. (Dropping the last incomplete *batch*, as
/// timm's training loader does, is the data loader's business, not the sampler's.)
pub fn shard_indices(
    n_items: usize,
    rank: usize,
    world: usize,
    epoch: u64,
    seed: u64,
    shuffle: bool,
) -> Result<Vec<usize>> {
    if rank >= world {
        return Err(DistError::InvalidRank {
            op: "shard_indices",
            rank,
            world,
        });
    }
    if n_items == 0 {
        return Ok(Vec::new());
    }
    let order = if shuffle {
        torch_randperm(n_items, seed.wrapping_add(epoch))
    } else {
        (0..n_items).collect()
    };
    let total = n_items.div_ceil(world) * world;
    Ok((rank..total)
        .step_by(world)
        .map(|i| order[i % n_items])
        .collect())
}

// ------------------------------------------------------------------------------------------------
// Launch environment
// ------------------------------------------------------------------------------------------------

/// Which launcher started this process, by the variables it set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one process, rank 0 of 1.
    Single,
    /// `torchrun` / `torch.distributed.launch`: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`
    /// (+ `LOCAL_WORLD_SIZE`).
    Torchrun,
    /// Slurm `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`.
    Slurm,
    /// Open MPI `mpirun`: `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`,
    /// `OMPI_COMM_WORLD_LOCAL_RANK` (+ `OMPI_COMM_WORLD_LOCAL_SIZE`).
    OpenMpi,
}

/// Where this process sits in the job, read from the launcher's environment variables.
///
/// Precedence: torchrun's variables, then Slurm's, then Open MPI's (torchrun run inside a Slurm
/// allocation sets both, and its `RANK` is the one that counts). `MASTER_ADDR` / `MASTER_PORT`
/// are read for every launcher (Slurm and MPI users export them in their job scripts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// The launcher detected.
    pub launcher: Launcher,
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Rank on this node (selects the GPU).
    pub local_rank: usize,
    /// Processes on this node, when the launcher says.
    pub local_world_size: Option<usize>,
    /// Rendezvous host (rank 0's address).
    pub master_addr: Option<String>,
    /// Rendezvous port.
    pub master_port: Option<u16>,
}

impl LaunchEnv {
    /// Reads the process environment. Errors on unparsable, missing or contradictory values,
    /// naming the variable.
    pub fn from_env() -> Result<Self> {
        let mut bad_unicode = None;
        let env = Self::from_vars(|k| match std::env::var(k) {
            Ok(v) => Some(v),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(v)) => {
                bad_unicode
                    .get_or_insert_with(|| (k.to_string(), v.to_string_lossy().into_owned()));
                Some(String::new())
            }
        });
        if let Some((var, value)) = bad_unicode {
            return Err(DistError::EnvValue {
                var,
                value,
                reason: "not valid UTF-8".into(),
            });
        }
        env
    }

    /// Parses the variables `get` returns (`None` = unset); [`LaunchEnv::from_env`] with the
    /// process environment, tests with a map.
    pub fn from_vars(mut get: impl FnMut(&str) -> Option<String>) -> Result<Self> {
        let master_addr = match get("MASTER_ADDR") {
            Some(v) if v.trim().is_empty() => {
                return Err(DistError::EnvValue {
                    var: "MASTER_ADDR".into(),
                    value: v,
                    reason: "empty".into(),
                });
            }
            Some(v) => Some(v.trim().to_string()),
            None => None,
        };
        let master_port = match get("MASTER_PORT") {
            None => None,
            Some(v) => match v.trim().parse::<u16>() {
                Ok(p) if p != 0 => Some(p),
                _ => {
                    return Err(DistError::EnvValue {
                        var: "MASTER_PORT".into(),
                        value: v,
                        reason: "not a port number in 1..=65535".into(),
                    });
                }
            },
        };

        struct Names {
            launcher: Launcher,
            rank: &'static str,
            world: &'static str,
            local_rank: &'static str,
            local_world: Option<&'static str>,
        }
        let torchrun = Names {
            launcher: Launcher::Torchrun,
            rank: "RANK",
            world: "WORLD_SIZE",
            local_rank: "LOCAL_RANK",
            local_world: Some("LOCAL_WORLD_SIZE"),
        };
        let slurm = Names {
            launcher: Launcher::Slurm,
            rank: "SLURM_PROCID",
            world: "SLURM_NTASKS",
            local_rank: "SLURM_LOCALID",
            local_world: None,
        };
        let mpi = Names {
            launcher: Launcher::OpenMpi,
            rank: "OMPI_COMM_WORLD_RANK",
            world: "OMPI_COMM_WORLD_SIZE",
            local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
            local_world: Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
        };

        let rank_var = get("RANK");
        let world_var = get("WORLD_SIZE");
        let (names, rank_s, world_s) = if rank_var.is_some() || world_var.is_some() {
            (torchrun, rank_var, world_var)
        } else if let Some(r) = get("SLURM_PROCID") {
            // SLURM_NPROCS is the older name of SLURM_NTASKS.
            let w = get("SLURM_NTASKS").or_else(|| get("SLURM_NPROCS"));
            (slurm, Some(r), w)
        } else if let Some(r) = get("OMPI_COMM_WORLD_RANK") {
            (mpi, Some(r), get("OMPI_COMM_WORLD_SIZE"))
        } else {
            return Ok(LaunchEnv {
                launcher: Launcher::Single,
                rank: 0,
                world_size: 1,
                local_rank: 0,
                local_world_size: None,
                master_addr,
                master_port,
            });
        };

        let parse = |var: &str, value: Option<String>, what: &str| -> Result<usize> {
            let value = value.ok_or_else(|| {
                DistError::Env(format!(
                    "{var} is not set, but {} is: {what}",
                    if var == names.rank {
                        names.world
                    } else {
                        names.rank
                    }
                ))
            })?;
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| DistError::EnvValue {
                    var: var.to_string(),
                    value: value.clone(),
                    reason: "not a non-negative integer".into(),
                })
        };
        let launcher_name = match names.launcher {
            Launcher::Torchrun => "torchrun sets RANK, WORLD_SIZE and LOCAL_RANK together",
            Launcher::Slurm => "srun sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID together",
            _ => "mpirun sets OMPI_COMM_WORLD_RANK, _SIZE and _LOCAL_RANK together",
        };
        let rank = parse(names.rank, rank_s, launcher_name)?;
        let world_size = parse(names.world, world_s, launcher_name)?;
        let local_rank_s = get(names.local_rank);
        let local_rank = match local_rank_s {
            None => {
                return Err(DistError::Env(format!(
                    "{} is not set ({launcher_name})",
                    names.local_rank
                )));
            }
            v => parse(names.local_rank, v, launcher_name)?,
        };
        let local_world_size = match names.local_world.map(|v| (v, get(v))) {
            Some((var, Some(v))) => Some(parse(var, Some(v), launcher_name)?),
            _ => None,
        };

        if world_size == 0 {
            return Err(DistError::Env(format!("{} is 0", names.world)));
        }
        if rank >= world_size {
            return Err(DistError::Env(format!(
                "{}={rank} is not below {}={world_size}",
                names.rank, names.world
            )));
        }
        if local_rank >= world_size {
            return Err(DistError::Env(format!(
                "{}={local_rank} is not below {}={world_size}",
                names.local_rank, names.world
            )));
        }
        if let (Some(lw), Some(lw_var)) = (local_world_size, names.local_world) {
            if lw == 0 || lw > world_size {
                return Err(DistError::Env(format!(
                    "{lw_var}={lw} must be in 1..={world_size} ({}={world_size})",
                    names.world
                )));
            }
            if local_rank >= lw {
                return Err(DistError::Env(format!(
                    "{}={local_rank} is not below {lw_var}={lw}",
                    names.local_rank
                )));
            }
        }
        Ok(LaunchEnv {
            launcher: names.launcher,
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
        })
    }

    /// Whether more than one process takes part.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// Whether this is rank 0 (logs, checkpoints, the rendezvous server).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The rendezvous address (`MASTER_ADDR`, `MASTER_PORT`), required by a multi-process
    /// communicator; errors naming whichever is missing.
    pub fn rendezvous(&self) -> Result<(String, u16)> {
        match (&self.master_addr, self.master_port) {
            (Some(addr), Some(port)) => Ok((addr.clone(), port)),
            (addr, port) => {
                let missing: Vec<&str> = [
                    addr.is_none().then_some("MASTER_ADDR"),
                    port.is_none().then_some("MASTER_PORT"),
                ]
                .into_iter()
                .flatten()
                .collect();
                Err(DistError::Env(format!(
                    "{} not set: rank 0's host and a free port are needed for the rendezvous \
                     (torchrun sets them; with {:?} export them in the job script)",
                    missing.join(" and "),
                    self.launcher
                )))
            }
        }
    }
}
