//! Data-parallel training: the collective operations a run over several processes
//! needs ([`Collective`]), their MPI implementation (`MpiGroup`, cargo feature `mpi`),
//! and the host-side gradient buffers that both the ranks and the single-process
//! micro-batch accumulation use.
//!
//! # How a step runs on N ranks
//!
//! Every rank loads the same seeded order and takes its contiguous share
//! ([`share`](crate::data::share)) of every global batch; it splits that share into
//! `micro_batches` pieces, and for each runs forward and backward and adds the gradient,
//! weighted by the piece's share of the global batch (`n / B`), into one flat `f32`
//! buffer (parameters in the model's visit order). The buffers are summed over the ranks
//! with one all-reduce, which makes every rank's buffer the gradient of the global
//! batch's mean loss; every rank then takes the same optimizer step, so the weights stay
//! identical without being sent. A second, small all-reduce sums the step's loss,
//! top-1/top-5 hits and image counts and carries the stop request, so every rank reports
//! the global figures and stops at the same step.
//!
//! Batch-norm running statistics (buffers that take no gradient) drift apart, as each
//! rank sees its own images: they are averaged over the ranks before every evaluation and
//! every checkpoint. Evaluation is split the same way as training and its tallies
//! summed.
//!
//! # Reproducibility
//!
//! A piece's dropout seed depends on its place in the global batch (`rank *
//! micro_batches + piece`), so N ranks with one micro-batch each draw what one process
//! with N micro-batches draws (with one compute thread each, the two give bit-identical
//! weights: the 2-rank test checks it within a tolerance). The step's metrics are summed
//! on rank 0 in rank order. The gradients go through `MPI_Allreduce`, whose order of
//! sums is MPI's: for a fixed number of ranks on the same hosts OpenMPI picks the same
//! algorithm every time (and for two ranks the sum is one commutative addition), so a
//! run is reproducible for a given seed, rank count and thread count.
//!
//! # Faults
//!
//! A rank that exits ends the job (mpirun aborts the others); an error on a rank is
//! printed with the rank's number before the CLI calls `MPI_Abort`. A watchdog thread
//! ends a rank that waits in one collective longer than the collective timeout (a rank
//! that hangs), naming the rank that timed out and the operation it waited in.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use crate::models::Model;

/// The collective operations data-parallel training needs, over a fixed group of ranks.
///
/// Every rank must call the same operations in the same order; each call blocks until
/// every rank has made it.
pub trait Collective: Send + Sync {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place: every rank gets the sums. `what` names
    /// the operation in a timeout message.
    fn sum_f32(&self, what: &str, values: &mut [f32]);
    /// As [`sum_f32`](Collective::sum_f32), in `f64`.
    fn sum_f64(&self, what: &str, values: &mut [f64]);
    /// Every rank's `value`, in rank order.
    fn gather_u64(&self, what: &str, value: u64) -> Vec<u64>;
}

/// The launchers' environment variables that tell a process it was started by mpirun
/// (OpenMPI, PMIx, MPICH/Hydra, Slurm's PMI).
pub const LAUNCHER_VARIABLES: [&str; 4] =
    ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"];

/// Whether this process was started by an MPI launcher (see [`LAUNCHER_VARIABLES`]).
pub fn launched_by_mpirun() -> bool {
    LAUNCHER_VARIABLES
        .iter()
        .any(|name| std::env::var_os(name).is_some())
}

/// The environment variable of the fault-injection hook the fault tests use:
/// `exit@RANK:STEP` makes rank `RANK` exit (status 9, no clean-up, as a crash) and
/// `hang@RANK:STEP` makes it sleep forever, just before optimizer step `STEP` (counted
/// over the run from 1). Only read in data-parallel runs.
pub const FAULT_VARIABLE: &str = "VERSATILE_TEST_FAULT";

/// Carries out the fault [`FAULT_VARIABLE`] asks of `rank` before step `step`, if any.
pub(crate) fn inject_fault(rank: usize, step: u64) {
    let Ok(spec) = std::env::var(FAULT_VARIABLE) else {
        return;
    };
    let parse = || -> Option<(String, usize, u64)> {
        let (kind, at) = spec.split_once('@')?;
        let (r, s) = at.split_once(':')?;
        Some((kind.to_string(), r.parse().ok()?, s.parse().ok()?))
    };
    match parse() {
        Some((kind, r, s)) if r == rank && s == step => {
            eprintln!("rank {rank}: {FAULT_VARIABLE}: {kind} before step {step}");
            if kind == "hang" {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            std::process::exit(9);
        }
        _ => {}
    }
}

/// A 64-bit FNV-1a hash of `values`' bit patterns: equal on two ranks exactly when the
/// values are bit for bit the same (up to hash collisions).
pub fn checksum(values: &[f32]) -> u64 {
    values.iter().fold(FNV_OFFSET, |hash, value| {
        fnv(hash, &value.to_bits().to_le_bytes())
    })
}

/// A 64-bit FNV-1a hash of `bytes`.
pub fn checksum_bytes(bytes: &[u8]) -> u64 {
    fnv(FNV_OFFSET, bytes)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &byte| {
        (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Values in `model`'s trainable parameters (the length of a flat gradient buffer).
pub(crate) fn trainable_len(model: &Model) -> usize {
    struct Count(usize);
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            if value.is_require_grad() {
                self.0 += value.shape().num_elements();
            }
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}

/// Values of a module's floating-point tensors, in visit order: the trainable
/// parameters (`trainable`) or the buffers that take no gradient (batch-norm running
/// statistics). On a device without autodiff every tensor counts as a buffer.
pub fn flatten(model: &Model, trainable: bool) -> Vec<f32> {
    struct Flatten {
        trainable: bool,
        out: Vec<f32>,
    }
    impl ModuleVisitor for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            if value.is_require_grad() == self.trainable {
                self.out.extend(host_values(value));
            }
        }
    }
    let mut visitor = Flatten {
        trainable,
        out: Vec::new(),
    };
    model.visit(&mut visitor);
    visitor.out
}

fn host_values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("float tensors convert to f32")
}

/// Replaces the values of `model`'s buffers (tensors that take no gradient) by
/// `values`, in visit order.
///
/// # Panics
/// When `values` does not hold exactly the buffers' values.
pub(crate) fn set_buffers(model: Model, values: &[f32]) -> Model {
    struct SetBuffers<'a> {
        values: &'a [f32],
        offset: usize,
    }
    impl ModuleMapper for SetBuffers<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, value, mapper) = param.consume();
            if value.is_require_grad() {
                return Param::from_mapped_value(id, value, mapper);
            }
            let shape = value.shape();
            let n = shape.num_elements();
            let slice = &self.values[self.offset..self.offset + n];
            self.offset += n;
            let new = Tensor::from_data(TensorData::new(slice.to_vec(), shape), &value.device());
            Param::from_mapped_value(id, new, mapper)
        }
    }
    let mut mapper = SetBuffers { values, offset: 0 };
    let model = model.map(&mut mapper);
    assert_eq!(
        mapper.offset,
        values.len(),
        "buffer values of another model"
    );
    model
}

/// Adds `scale` × the gradients of `model`'s trainable parameters in `grads` to `out`
/// (parameters in visit order; a parameter without a gradient adds nothing).
pub(crate) fn accumulate_grads(
    model: &Model,
    grads: &GradientsParams,
    scale: f32,
    out: &mut [f32],
) {
    struct Accumulate<'a> {
        grads: &'a GradientsParams,
        scale: f32,
        out: &'a mut [f32],
        offset: usize,
    }
    impl ModuleVisitor for Accumulate<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            if !value.is_require_grad() {
                return;
            }
            let n = value.shape().num_elements();
            if let Some(grad) = self.grads.get::<D>(param.id) {
                let grad = host_values(grad);
                for (slot, g) in self.out[self.offset..self.offset + n].iter_mut().zip(grad) {
                    *slot += g * self.scale;
                }
            }
            self.offset += n;
        }
    }
    let mut visitor = Accumulate {
        grads,
        scale,
        out,
        offset: 0,
    };
    model.visit(&mut visitor);
}

/// The gradients in `flat` (trainable parameters of `model` in visit order) as burn's
/// gradients, on `device` (the model's device without autodiff).
pub(crate) fn grads_from_flat(model: &Model, flat: &[f32], device: &Device) -> GradientsParams {
    struct Unflatten<'a> {
        flat: &'a [f32],
        device: &'a Device,
        offset: usize,
        grads: GradientsParams,
    }
    impl ModuleVisitor for Unflatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            if !value.is_require_grad() {
                return;
            }
            let shape = value.shape();
            let n = shape.num_elements();
            let slice = self.flat[self.offset..self.offset + n].to_vec();
            self.offset += n;
            let grad = Tensor::<D>::from_data(TensorData::new(slice, shape), self.device);
            self.grads.register::<D>(param.id, grad);
        }
    }
    let mut visitor = Unflatten {
        flat,
        device,
        offset: 0,
        grads: GradientsParams::new(),
    };
    model.visit(&mut visitor);
    visitor.grads
}

#[cfg(feature = "mpi")]
pub use self::mpi_group::MpiGroup;

#[cfg(feature = "mpi")]
mod mpi_group {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
    use mpi::environment::Universe;
    use mpi::point_to_point::{Destination, Source};
    use mpi::topology::{Communicator, SimpleCommunicator};

    use super::Collective;

    /// Exit status of a rank that the watchdog ends.
    pub const EXIT_TIMEOUT: i32 = 3;

    /// The ranks of `mpirun`'s world, through MPI (rsmpi on the system's MPI library).
    ///
    /// Dropping it finalizes MPI; create it once per process.
    ///
    /// MPI is initialized for one thread at a time (`MPI_THREAD_SINGLE`): call it from
    /// one thread at a time, as a trainer does.
    pub struct MpiGroup {
        universe: Universe,
        rank: usize,
        size: usize,
        local_size: usize,
        /// The collective in progress and since when, for the watchdog.
        waiting: Arc<Mutex<Option<(String, Instant)>>>,
    }

    impl std::fmt::Debug for MpiGroup {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("MpiGroup")
                .field("rank", &self.rank)
                .field("size", &self.size)
                .field("local_size", &self.local_size)
                .finish_non_exhaustive()
        }
    }

    impl MpiGroup {
        /// Initializes MPI and joins the world. `timeout`: how long one collective may
        /// wait for the other ranks before this rank ends the job (`None`: forever).
        ///
        /// Returns `None` when MPI was initialized already in this process.
        pub fn init(timeout: Option<Duration>) -> Option<Self> {
            let universe = mpi::initialize()?;
            let world = universe.world();
            let rank = world.rank() as usize;
            let size = world.size() as usize;
            let local_size = world.split_shared(0).size() as usize;
            let waiting: Arc<Mutex<Option<(String, Instant)>>> = Arc::new(Mutex::new(None));
            if let Some(timeout) = timeout {
                let waiting = Arc::clone(&waiting);
                let poll = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
                // Detached: it ends with the process.
                let _ = std::thread::Builder::new()
                    .name("versatile-mpi-watchdog".into())
                    .spawn(move || loop {
                        std::thread::sleep(poll);
                        let stuck = waiting
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .filter(|(_, since)| since.elapsed() > timeout)
                            .map(|(what, _)| what.clone());
                        if let Some(what) = stuck {
                            eprintln!(
                                "error: rank {rank} of {size}: {what} for more than {} s (it died or hangs; --collective-timeout sets the limit): ending the run; resume it from its last checkpoint with --resume",
                                timeout.as_secs_f64()
                            );
                            std::process::exit(EXIT_TIMEOUT);
                        }
                    });
            }
            Some(MpiGroup {
                universe,
                rank,
                size,
                local_size,
                waiting,
            })
        }

        /// MPI's world communicator (a handle: cheap).
        fn world(&self) -> SimpleCommunicator {
            self.universe.world()
        }

        /// Ranks on this host (sharing its memory).
        pub fn local_size(&self) -> usize {
            self.local_size
        }

        /// Prints `message` naming this rank and ends every rank of the job
        /// (`MPI_Abort`).
        pub fn abort(&self, message: &str, code: i32) -> ! {
            eprintln!("error: rank {} of {}: {message}", self.rank, self.size);
            self.world().abort(code)
        }

        fn watched<T>(&self, what: &str, op: impl FnOnce() -> T) -> T {
            *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((what.to_string(), Instant::now()));
            let out = op();
            *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = None;
            out
        }
    }

    impl Collective for MpiGroup {
        fn rank(&self) -> usize {
            self.rank
        }

        fn size(&self) -> usize {
            self.size
        }

        fn sum_f32(&self, what: &str, values: &mut [f32]) {
            let send = values.to_vec();
            self.watched(&format!("{what}: waiting for another rank"), || {
                self.world()
                    .all_reduce_into(&send[..], values, SystemOperation::sum())
            });
        }

        /// Gathered on rank 0 in rank order, summed there in rank order, sent back: a
        /// fixed order of sums, and a rank that does not arrive is named (meant for the
        /// few values of a step's metrics; [`sum_f32`](Collective::sum_f32) all-reduces).
        fn sum_f64(&self, what: &str, values: &mut [f64]) {
            let world = self.world();
            let root = world.process_at_rank(0);
            if self.rank == 0 {
                let mut other = vec![0f64; values.len()];
                for rank in 1..self.size {
                    self.watched(&format!("{what}: waiting for rank {rank}"), || {
                        world
                            .process_at_rank(rank as i32)
                            .receive_into(&mut other[..]);
                    });
                    values.iter_mut().zip(&other).for_each(|(v, o)| *v += o);
                }
            } else {
                root.send(&values[..]);
            }
            self.watched(&format!("{what}: waiting for rank 0"), || {
                root.broadcast_into(values)
            });
        }

        fn gather_u64(&self, what: &str, value: u64) -> Vec<u64> {
            let mut out = vec![0u64; self.size];
            self.watched(&format!("{what}: waiting for another rank"), || {
                self.world().all_gather_into(&value, &mut out[..])
            });
            out
        }
    }
}
