//! A cubecl runtime for CUDA without a GPU. `CaptureRuntime`'s compiler is
//! cubecl-cuda's own (`CudaCompiler`), its target properties are cubecl-cuda's, and
//! its device properties and compilation options are built as cubecl-cuda 0.10
//! builds them at device start-up (`runtime.rs`), with the driver's answers replaced
//! by the reference GPU of a `CudaTarget`. Its server holds no memory (reads return
//! zeros, allocations cost nothing, so paper-scale plans run) and launches nothing:
//! each kernel is translated to CUDA C++ as `CudaContext::compile_kernel` would and
//! recorded with its launch, for NVRTC to compile later.
//!
//! Anything generic over `R: Runtime` (`Kernels<R>`, `DeviceBackend<R>`) runs on it
//! unchanged, so what is recorded is exactly what the CUDA runtime would compile.

use crate::target::CudaTarget;
use cubecl::client::ComputeClient;
use cubecl::device::{Device, DeviceId, DeviceService, ServerUtilitiesHandle};
use cubecl::future::DynFut;
use cubecl::ir::{
    features::{AtomicUsage, Plane, Tma, TypeUsage},
    BarrierLevel, DeviceProperties, ElemType, FloatKind, HardwareProperties,
    MemoryDeviceProperties, OpaqueType, SemanticType, StorageType, TargetProperties, Type,
    VectorSize,
};
use cubecl::profile::{ProfileDuration, TimingMethod};
use cubecl::server::{
    Binding, ComputeServer, CopyDescriptor, CubeCount, ExecutionMode, IoError, KernelArguments,
    ProfileError, ProfilingToken, ServerCommunication, ServerError, ServerUtilities,
};
use cubecl::stream_id::StreamId;
use cubecl::zspace::{Shape, Strides};
use cubecl::{CubeTask, Runtime};
use cubecl_cpp::cuda::arch::CudaArchitecture;
use cubecl_cpp::cuda::mma::CudaWmmaCompiler;
use cubecl_cpp::shared::{
    register_mma_features, register_scaled_mma_features, register_wmma_features,
    CompilationOptions, CppSupportedFeatures,
};
use cubecl_cpp::DialectWmmaCompiler;
use cubecl_runtime::allocator::PitchedMemoryLayoutPolicy;
use cubecl_runtime::logging::ServerLogger;
use cubecl_runtime::memory_management::{ManagedMemoryHandle, MemoryAllocationMode, MemoryUsage};
use cubecl_runtime::storage::{
    ComputeStorage, ManagedResource, StorageHandle, StorageId, StorageUtilization,
};
use cubecl_runtime::timestamp_profiler::TimestampProfiler;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use cubecl::cuda::CudaCompiler;

/// Where a launch came from, as the caller last said (`set_launch_context`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LaunchContext {
    /// What ran: model, graph, variant (`alt_moe_tiny image_to_text.step f32 ...`).
    pub workload: String,
    /// The plan's kernel family (`fused elementwise`, `matmul`, ...).
    pub family: String,
    /// The graph node the kernel produces, and the spec path it comes from.
    pub node: Option<usize>,
    pub origin: String,
}

/// One distinct kernel as the CUDA runtime would compile it.
#[derive(Clone, Debug)]
pub struct CapturedKernel {
    pub target: CudaTarget,
    /// The kernel's Rust type (`altc_kernels::fused::FusedKernel<f32, ...>`).
    pub type_name: String,
    /// Its comptime configuration and execution mode, as cubecl's kernel id prints.
    pub id: String,
    pub entrypoint: String,
    pub cube_dim: (u32, u32, u32),
    /// CUDA C++, or why cubecl-cpp refused to write it.
    pub source: Result<String, String>,
    /// Dynamic shared memory the runtime requests at launch.
    pub dynamic_shared: usize,
    /// What cubecl-cuda checks before it compiles (cube dimensions, units).
    pub validation: Option<String>,
}

/// One launch: which kernel, how many cubes, and where it came from.
#[derive(Clone, Debug)]
pub struct Launch {
    /// Index into `Recording::kernels`.
    pub kernel: usize,
    /// `None` for a count read from a device buffer at launch.
    pub cube_count: Option<(u32, u32, u32)>,
    pub context: Arc<LaunchContext>,
}

/// Everything launched on capture devices so far.
#[derive(Debug, Default)]
pub struct Recording {
    pub kernels: Vec<CapturedKernel>,
    pub launches: Vec<Launch>,
}

#[derive(Default)]
struct Recorder {
    recording: Recording,
    /// Kernel ids seen per target, to their index in `recording.kernels`.
    seen: HashMap<(CudaTarget, cubecl_runtime::id::KernelId), usize>,
    context: Arc<LaunchContext>,
}

static RECORDER: Mutex<Option<Recorder>> = Mutex::new(None);

fn with_recorder<T>(f: impl FnOnce(&mut Recorder) -> T) -> T {
    let mut guard = RECORDER.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Recorder::default))
}

/// Attributes the launches that follow to `context`. Launches reach the server on
/// its own thread: synchronise the client before changing the context.
pub fn set_launch_context(context: LaunchContext) {
    with_recorder(|r| r.context = Arc::new(context));
}

/// Takes everything recorded so far, leaving the recorder empty.
pub fn take_recording() -> Recording {
    with_recorder(|r| {
        r.seen.clear();
        std::mem::take(&mut r.recording)
    })
}

/// A capture device: one per CUDA target.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct CaptureDevice {
    pub target: CudaTarget,
}

impl Default for CaptureDevice {
    fn default() -> Self {
        CaptureDevice {
            target: CudaTarget::SM90A,
        }
    }
}

impl Device for CaptureDevice {
    fn from_id(id: DeviceId) -> Self {
        CaptureDevice {
            target: CudaTarget {
                version: u32::from(id.index_id),
            },
        }
    }
    fn to_id(&self) -> DeviceId {
        DeviceId {
            type_id: 0,
            index_id: self.target.version as u16,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CaptureRuntime;

impl CaptureRuntime {
    /// The client of the capture device for `target`.
    pub fn client_for(target: CudaTarget) -> ComputeClient<CaptureRuntime> {
        CaptureRuntime::client(&CaptureDevice { target })
    }
}

impl Runtime for CaptureRuntime {
    type Compiler = CudaCompiler;
    type Server = CaptureServer;
    type Device = CaptureDevice;

    fn client(device: &Self::Device) -> ComputeClient<Self> {
        ComputeClient::load(device)
    }
    fn name(_client: &ComputeClient<Self>) -> &'static str {
        "cuda-capture"
    }
    fn require_array_lengths() -> bool {
        cubecl::cuda::CudaRuntime::require_array_lengths()
    }
    fn max_cube_count() -> (u32, u32, u32) {
        cubecl::cuda::CudaRuntime::max_cube_count()
    }
    fn can_read_tensor(shape: &Shape, strides: &Strides) -> bool {
        cubecl::cuda::CudaRuntime::can_read_tensor(shape, strides)
    }
    fn target_properties() -> TargetProperties {
        // A plain constructor in cubecl-cuda: no driver call.
        cubecl::cuda::CudaRuntime::target_properties()
    }
    fn enumerate_devices(_: u16, _: &()) -> Vec<DeviceId> {
        CudaTarget::ALL
            .iter()
            .map(|&target| CaptureDevice { target }.to_id())
            .collect()
    }
}

/// Storage that hands out ids and holds nothing.
#[derive(Debug, Default)]
pub struct NullStorage;

impl ComputeStorage for NullStorage {
    type Resource = ();
    fn alignment(&self) -> usize {
        512
    }
    fn get(&mut self, _handle: &StorageHandle) {}
    fn alloc(&mut self, size: u64) -> Result<StorageHandle, IoError> {
        Ok(StorageHandle::new(
            StorageId::new(),
            StorageUtilization { offset: 0, size },
        ))
    }
    fn dealloc(&mut self, _id: StorageId) {}
    fn flush(&mut self) {}
}

#[derive(Debug)]
pub struct CaptureServer {
    target: CudaTarget,
    options: CompilationOptions,
    properties: DeviceProperties,
    utilities: Arc<ServerUtilities<Self>>,
    timestamps: TimestampProfiler,
}

impl ServerCommunication for CaptureServer {
    const SERVER_COMM_ENABLED: bool = false;
}

impl DeviceService for CaptureServer {
    fn init(device_id: DeviceId) -> Self {
        let target = CaptureDevice::from_id(device_id).target;
        let (properties, options) = cuda_properties(target);
        let policy = PitchedMemoryLayoutPolicy::new(properties.memory.alignment as usize);
        let utilities = Arc::new(ServerUtilities::new(
            properties.clone(),
            Arc::new(ServerLogger::default()),
            (),
            policy,
        ));
        CaptureServer {
            target,
            options,
            properties,
            utilities,
            timestamps: TimestampProfiler::default(),
        }
    }

    fn utilities(&self) -> ServerUtilitiesHandle {
        ComputeServer::utilities(self) as ServerUtilitiesHandle
    }
}

impl CaptureServer {
    /// Translates a kernel to CUDA C++ as `CudaContext::compile_kernel` does.
    fn translate(
        &self,
        kernel: &<Self as ComputeServer>::Kernel,
        kernel_id: &cubecl_runtime::id::KernelId,
        mode: ExecutionMode,
    ) -> CapturedKernel {
        let mut validation = Vec::new();
        if let Err(e) = cubecl_runtime::validation::validate_cube_dim(&self.properties, kernel_id) {
            validation.push(format!("{e:?}"));
        }
        if let Err(e) = cubecl_runtime::validation::validate_units(&self.properties, kernel_id) {
            validation.push(format!("{e:?}"));
        }
        let compiled = kernel.compile(
            &mut CudaCompiler::default(),
            &self.options,
            mode,
            kernel.address_type(),
        );
        let d = kernel_id.cube_dim;
        let mut captured = CapturedKernel {
            target: self.target,
            type_name: kernel.name().to_string(),
            id: format!("{kernel_id} {mode:?}"),
            entrypoint: String::new(),
            cube_dim: (d.x, d.y, d.z),
            source: Err(String::new()),
            dynamic_shared: 0,
            validation: None,
        };
        match compiled {
            Ok(c) => {
                captured.dynamic_shared = c.repr.as_ref().map_or(0, |r| r.shared_memory_size());
                captured.cube_dim = (c.cube_dim.x, c.cube_dim.y, c.cube_dim.z);
                captured.entrypoint = c.entrypoint_name;
                captured.source = Ok(c.source);
            }
            Err(e) => captured.source = Err(format!("{e:?}")),
        }
        captured.validation = (!validation.is_empty()).then(|| validation.join("; "));
        captured
    }
}

impl ComputeServer for CaptureServer {
    type Kernel = Box<dyn CubeTask<CudaCompiler>>;
    type Info = ();
    type MemoryLayoutPolicy = PitchedMemoryLayoutPolicy;
    type Storage = NullStorage;

    fn initialize_memory(&mut self, _memory: ManagedMemoryHandle, _size: u64, _s: StreamId) {}

    fn logger(&self) -> Arc<ServerLogger> {
        self.utilities.logger.clone()
    }

    fn utilities(&self) -> Arc<ServerUtilities<Self>> {
        self.utilities.clone()
    }

    fn read(
        &mut self,
        descriptors: Vec<CopyDescriptor>,
        _stream_id: StreamId,
    ) -> DynFut<Result<Vec<cubecl::bytes::Bytes>, ServerError>> {
        let sizes: Vec<usize> = descriptors
            .iter()
            .map(|d| d.handle.size_in_used() as usize)
            .collect();
        Box::pin(async move {
            Ok(sizes
                .into_iter()
                .map(|n| cubecl::bytes::Bytes::from_bytes_vec(vec![0u8; n]))
                .collect())
        })
    }

    fn write(&mut self, _d: Vec<(CopyDescriptor, cubecl::bytes::Bytes)>, _s: StreamId) {}

    fn sync(&mut self, _stream_id: StreamId) -> DynFut<Result<(), ServerError>> {
        Box::pin(async { Ok(()) })
    }

    fn get_resource(
        &mut self,
        binding: Binding,
        _stream_id: StreamId,
    ) -> Result<ManagedResource<()>, ServerError> {
        Ok(ManagedResource::new(binding.memory, ()))
    }

    unsafe fn launch(
        &mut self,
        kernel: Self::Kernel,
        count: CubeCount,
        _bindings: KernelArguments,
        mode: ExecutionMode,
        _stream_id: StreamId,
    ) {
        // The kernel id carries the mode, as in `CudaServer::launch_checked`.
        let mut kernel_id = kernel.id();
        kernel_id.mode(mode);
        let cube_count = match count {
            CubeCount::Static(x, y, z) => Some((x, y, z)),
            CubeCount::Dynamic(_) => None,
        };
        let key = (self.target, kernel_id);
        let known = with_recorder(|r| r.seen.get(&key).copied());
        // Translating can take a while; do it outside the recorder's lock.
        let index = match known {
            Some(index) => index,
            None => {
                let captured = self.translate(&kernel, &key.1, mode);
                with_recorder(|r| {
                    *r.seen.entry(key).or_insert_with(|| {
                        r.recording.kernels.push(captured);
                        r.recording.kernels.len() - 1
                    })
                })
            }
        };
        with_recorder(|r| {
            let context = r.context.clone();
            r.recording.launches.push(Launch {
                kernel: index,
                cube_count,
                context,
            });
        });
    }

    fn flush(&mut self, _stream_id: StreamId) -> Result<(), ServerError> {
        Ok(())
    }

    fn memory_usage(&mut self, _stream_id: StreamId) -> Result<MemoryUsage, ServerError> {
        Ok(MemoryUsage {
            number_allocs: 0,
            bytes_in_use: 0,
            bytes_padding: 0,
            bytes_reserved: 0,
        })
    }

    fn memory_cleanup(&mut self, _stream_id: StreamId) {}

    fn start_profile(&mut self, _stream_id: StreamId) -> Result<ProfilingToken, ServerError> {
        Ok(self.timestamps.start())
    }

    fn end_profile(
        &mut self,
        _stream_id: StreamId,
        token: ProfilingToken,
    ) -> Result<ProfileDuration, ProfileError> {
        self.timestamps.stop(token)
    }

    fn allocation_mode(&mut self, _mode: MemoryAllocationMode, _stream_id: StreamId) {}
}

/// Device properties and compilation options as cubecl-cuda's `DeviceService::init`
/// builds them, with the driver's queries answered by `target`'s reference GPU:
/// warp 32, grid constants from sm_70, fast math, clusters and `elect.sync` from
/// sm_90, and the wmma/mma combinations cubecl-cpp supports for the architecture.
pub fn cuda_properties(target: CudaTarget) -> (DeviceProperties, CompilationOptions) {
    let version = target.version;
    let hw = target.hardware();
    let arch = CudaArchitecture { version };
    let wmma = CudaWmmaCompiler::supported_wmma_combinations(&arch);
    let mma = CudaWmmaCompiler::supported_mma_combinations(&arch);
    let scaled_mma = CudaWmmaCompiler::supported_scaled_mma_combinations(&arch);
    let memory = MemoryDeviceProperties {
        // A quarter of an 80 GB device, as cubecl-cuda takes a quarter of its total.
        max_page_size: 20 << 30,
        alignment: 512,
    };
    let mut options = CompilationOptions {
        supports_features: CppSupportedFeatures {
            fast_math: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let warp_size = 32;
    options.warp_size = warp_size;
    let hardware = HardwareProperties {
        load_width: 128,
        plane_size_min: warp_size,
        plane_size_max: warp_size,
        max_bindings: 1024,
        max_shared_memory_size: hw.shared_per_block_opt_in as usize,
        max_cube_count: (
            crate::target::MAX_GRID_X,
            crate::target::MAX_GRID_YZ,
            crate::target::MAX_GRID_YZ,
        ),
        max_units_per_cube: crate::target::MAX_THREADS_PER_BLOCK,
        max_cube_dim: (1024, 1024, 64),
        num_streaming_multiprocessors: Some(hw.sms),
        num_tensor_cores: Some(4),
        min_tensor_cores_dim: (!wmma.is_empty()).then_some(8),
        num_cpu_cores: None,
        max_vector_size: VectorSize::MAX,
    };
    let mut props =
        DeviceProperties::new(Default::default(), memory, hardware, TimingMethod::System);
    cubecl_cpp::register_supported_types(&mut props);
    props.register_type_usage(ElemType::Float(FloatKind::TF32), TypeUsage::Conversion);
    let float_atomic = |kind, vector: usize| {
        let scalar = Type::new(StorageType::Atomic(ElemType::Float(kind)));
        if vector > 1 {
            scalar.with_vector_size(vector)
        } else {
            scalar
        }
    };
    props.register_atomic_type_usage(
        float_atomic(FloatKind::F64, 1),
        AtomicUsage::Add | AtomicUsage::LoadStore,
    );
    for vector in [1, 2] {
        props.register_atomic_type_usage(
            float_atomic(FloatKind::F16, vector),
            AtomicUsage::Add | AtomicUsage::LoadStore,
        );
    }
    props.register_semantic_type(SemanticType::Pipeline);
    props.register_type_usage(OpaqueType::Barrier(BarrierLevel::Unit), TypeUsage::Buffer);
    props.register_type_usage(OpaqueType::Barrier(BarrierLevel::Cube), TypeUsage::Buffer);
    props.features.plane.insert(Plane::Sync);
    options.supports_features.grid_constants = true;
    // Half-precision matrix loads everywhere; stores from sm_90.
    for kind in [FloatKind::F16, FloatKind::BF16] {
        let matmul = &mut props.features.matmul;
        matmul.ldmatrix.insert(ElemType::Float(kind).into());
        if version >= 90 {
            matmul.stmatrix.insert(ElemType::Float(kind).into());
        }
    }
    options.supports_features.fast_tanh = cudarc::driver::sys::CUDA_VERSION >= 12080;
    props.features.copy_async = true;
    if version >= 89 {
        for kind in [FloatKind::E4M3, FloatKind::E5M2] {
            props.register_type_usage(
                ElemType::Float(kind),
                TypeUsage::Conversion | TypeUsage::Buffer,
            );
        }
    }
    if version >= 90 {
        props.features.tma.insert(Tma::Base);
        props.register_semantic_type(SemanticType::TensorMap);
        props.features.cube_cluster = true;
        options.supports_features.clusters = true;
        options.supports_features.elect_sync = true;
        for vector in [2, 4] {
            props.register_atomic_type_usage(
                float_atomic(FloatKind::F32, vector),
                AtomicUsage::LoadStore | AtomicUsage::Add,
            );
        }
    }
    props.features.memory_reinterpret = true;
    props.features.alignment = true;
    props.features.plane.insert(Plane::Ops);
    props.features.plane.insert(Plane::NonUniformControlFlow);
    register_wmma_features(wmma, &mut props);
    register_mma_features(mma, &mut props);
    register_scaled_mma_features(scaled_mma, &mut props);
    (props, options)
}
