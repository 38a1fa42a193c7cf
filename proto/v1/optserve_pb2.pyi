from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]

class WeightDecayMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_DECAY_LR: _ClassVar[WeightDecayMode]
    WEIGHT_DECAY_SCHEDULE: _ClassVar[WeightDecayMode]
    WEIGHT_DECAY_FIXED: _ClassVar[WeightDecayMode]

class EpsMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EPS_TORCH: _ClassVar[EpsMode]
    EPS_KERAS: _ClassVar[EpsMode]

class ConsistencyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SYNC: _ClassVar[ConsistencyMode]
    ASYNC: _ClassVar[ConsistencyMode]

class NonFinitePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NONFINITE_REFUSE: _ClassVar[NonFinitePolicy]
    NONFINITE_SKIP: _ClassVar[NonFinitePolicy]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
WEIGHT_DECAY_LR: WeightDecayMode
WEIGHT_DECAY_SCHEDULE: WeightDecayMode
WEIGHT_DECAY_FIXED: WeightDecayMode
EPS_TORCH: EpsMode
EPS_KERAS: EpsMode
SYNC: ConsistencyMode
ASYNC: ConsistencyMode
NONFINITE_REFUSE: NonFinitePolicy
NONFINITE_SKIP: NonFinitePolicy

class Hyperparameters(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "eps", "weight_decay", "weight_decay_mode", "initial_lr", "maximize", "amsgrad", "delta", "wd_ratio", "nesterov", "eps2", "clip_threshold", "decay_rate", "adafactor_beta1", "scale_parameter", "relative_step", "warmup_init", "eps_mode")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_MODE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LR_FIELD_NUMBER: _ClassVar[int]
    MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
    AMSGRAD_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    WD_RATIO_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    EPS2_FIELD_NUMBER: _ClassVar[int]
    CLIP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DECAY_RATE_FIELD_NUMBER: _ClassVar[int]
    ADAFACTOR_BETA1_FIELD_NUMBER: _ClassVar[int]
    SCALE_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_STEP_FIELD_NUMBER: _ClassVar[int]
    WARMUP_INIT_FIELD_NUMBER: _ClassVar[int]
    EPS_MODE_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    weight_decay_mode: WeightDecayMode
    initial_lr: float
    maximize: bool
    amsgrad: bool
    delta: float
    wd_ratio: float
    nesterov: bool
    eps2: float
    clip_threshold: float
    decay_rate: float
    adafactor_beta1: float
    scale_parameter: bool
    relative_step: bool
    warmup_init: bool
    eps_mode: EpsMode
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., weight_decay_mode: _Optional[_Union[WeightDecayMode, str]] = ..., initial_lr: _Optional[float] = ..., maximize: _Optional[bool] = ..., amsgrad: _Optional[bool] = ..., delta: _Optional[float] = ..., wd_ratio: _Optional[float] = ..., nesterov: _Optional[bool] = ..., eps2: _Optional[float] = ..., clip_threshold: _Optional[float] = ..., decay_rate: _Optional[float] = ..., adafactor_beta1: _Optional[float] = ..., scale_parameter: _Optional[bool] = ..., relative_step: _Optional[bool] = ..., warmup_init: _Optional[bool] = ..., eps_mode: _Optional[_Union[EpsMode, str]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "group")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    group: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., group: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("job", "optimizer", "tensors", "groups", "num_workers", "mode", "grad_dtype", "num_shards", "backup_workers", "max_staleness", "staleness_lr", "barrier_timeout_s", "proceed_on_timeout", "param_dtype", "nonfinite")
    JOB_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GRAD_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_LR_FIELD_NUMBER: _ClassVar[int]
    BARRIER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    PROCEED_ON_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    PARAM_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELD_NUMBER: _ClassVar[int]
    job: str
    optimizer: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    groups: _containers.RepeatedCompositeFieldContainer[Hyperparameters]
    num_workers: int
    mode: ConsistencyMode
    grad_dtype: DType
    num_shards: int
    backup_workers: int
    max_staleness: int
    staleness_lr: bool
    barrier_timeout_s: float
    proceed_on_timeout: bool
    param_dtype: DType
    nonfinite: NonFinitePolicy
    def __init__(self, job: _Optional[str] = ..., optimizer: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[Hyperparameters, _Mapping]]] = ..., num_workers: _Optional[int] = ..., mode: _Optional[_Union[ConsistencyMode, str]] = ..., grad_dtype: _Optional[_Union[DType, str]] = ..., num_shards: _Optional[int] = ..., backup_workers: _Optional[int] = ..., max_staleness: _Optional[int] = ..., staleness_lr: _Optional[bool] = ..., barrier_timeout_s: _Optional[float] = ..., proceed_on_timeout: _Optional[bool] = ..., param_dtype: _Optional[_Union[DType, str]] = ..., nonfinite: _Optional[_Union[NonFinitePolicy, str]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RegisterJobRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RegisterHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[RegisterHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class RegisterHeader(_message.Message):
    __slots__ = ("spec", "shard", "worker", "session", "resume")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    shard: int
    worker: int
    session: str
    resume: bool
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., shard: _Optional[int] = ..., worker: _Optional[int] = ..., session: _Optional[str] = ..., resume: _Optional[bool] = ...) -> None: ...

class RegisterJobResponse(_message.Message):
    __slots__ = ("created", "version", "tensors", "last_step")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    created: bool
    version: int
    tensors: _containers.RepeatedScalarFieldContainer[int]
    last_step: int
    def __init__(self, created: _Optional[bool] = ..., version: _Optional[int] = ..., tensors: _Optional[_Iterable[int]] = ..., last_step: _Optional[int] = ...) -> None: ...

class LeaveJobRequest(_message.Message):
    __slots__ = ("job", "worker", "session")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    session: str
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class LeaveJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: StepHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[StepHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class StepHeader(_message.Message):
    __slots__ = ("job", "worker", "step", "tensors", "groups", "dtype", "version", "session", "nonfinite", "shared_memory_key")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_KEY_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    step: int
    tensors: _containers.RepeatedScalarFieldContainer[int]
    groups: _containers.RepeatedCompositeFieldContainer[Hyperparameters]
    dtype: DType
    version: int
    session: str
    nonfinite: bool
    shared_memory_key: bytes
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., step: _Optional[int] = ..., tensors: _Optional[_Iterable[int]] = ..., groups: _Optional[_Iterable[_Union[Hyperparameters, _Mapping]]] = ..., dtype: _Optional[_Union[DType, str]] = ..., version: _Optional[int] = ..., session: _Optional[str] = ..., nonfinite: _Optional[bool] = ..., shared_memory_key: _Optional[bytes] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("version", "tensors", "total_bytes", "dtype", "dropped", "drop_reason", "last_step", "shared_memory", "in_rounds_segment")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DROP_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    IN_ROUNDS_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensors: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    dtype: DType
    dropped: bool
    drop_reason: str
    last_step: int
    shared_memory: bool
    in_rounds_segment: bool
    def __init__(self, version: _Optional[int] = ..., tensors: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., dropped: _Optional[bool] = ..., drop_reason: _Optional[str] = ..., last_step: _Optional[int] = ..., shared_memory: _Optional[bool] = ..., in_rounds_segment: _Optional[bool] = ...) -> None: ...

class AttachSharedMemoryRequest(_message.Message):
    __slots__ = ("job", "worker", "session")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    session: str
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class AttachSharedMemoryResponse(_message.Message):
    __slots__ = ("host", "reason", "rounds")
    HOST_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    host: HostSegment
    reason: str
    rounds: HostSegment
    def __init__(self, host: _Optional[_Union[HostSegment, _Mapping]] = ..., reason: _Optional[str] = ..., rounds: _Optional[_Union[HostSegment, _Mapping]] = ...) -> None: ...

class HostSegment(_message.Message):
    __slots__ = ("pid", "fd", "size", "key_sha256", "gradient_offset", "gradient_bytes", "reply_offset", "reply_bytes")
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLY_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    fd: int
    size: int
    key_sha256: bytes
    gradient_offset: int
    gradient_bytes: int
    reply_offset: int
    reply_bytes: int
    def __init__(self, pid: _Optional[int] = ..., fd: _Optional[int] = ..., size: _Optional[int] = ..., key_sha256: _Optional[bytes] = ..., gradient_offset: _Optional[int] = ..., gradient_bytes: _Optional[int] = ..., reply_offset: _Optional[int] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class PullParametersRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class TensorStream(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class GetOptimizerStateRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class StateEntry(_message.Message):
    __slots__ = ("tensor", "field", "shape", "offset")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    field: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, tensor: _Optional[int] = ..., field: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("job", "optimizer", "entries", "tensors", "steps", "total_bytes", "version")
    JOB_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    job: str
    optimizer: str
    entries: _containers.RepeatedCompositeFieldContainer[StateEntry]
    tensors: _containers.RepeatedScalarFieldContainer[int]
    steps: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    version: int
    def __init__(self, job: _Optional[str] = ..., optimizer: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[StateEntry, _Mapping]]] = ..., tensors: _Optional[_Iterable[int]] = ..., steps: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class StateStream(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class SetOptimizerStateResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("job", "version", "worker")
    JOB_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    job: str
    version: int
    worker: int
    def __init__(self, job: _Optional[str] = ..., version: _Optional[int] = ..., worker: _Optional[int] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("version", "last_step")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    version: int
    last_step: int
    def __init__(self, version: _Optional[int] = ..., last_step: _Optional[int] = ...) -> None: ...
