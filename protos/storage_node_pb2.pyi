from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorProto(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: TensorProto
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[TensorProto, _Mapping]] = ...) -> None: ...

class FeatureBags(_message.Message):
    __slots__ = ("feature", "indices", "offsets", "per_sample_weights", "mean_divisor")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    PER_SAMPLE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MEAN_DIVISOR_FIELD_NUMBER: _ClassVar[int]
    feature: str
    indices: TensorProto
    offsets: TensorProto
    per_sample_weights: TensorProto
    mean_divisor: TensorProto
    def __init__(self, feature: _Optional[str] = ..., indices: _Optional[_Union[TensorProto, _Mapping]] = ..., offsets: _Optional[_Union[TensorProto, _Mapping]] = ..., per_sample_weights: _Optional[_Union[TensorProto, _Mapping]] = ..., mean_divisor: _Optional[_Union[TensorProto, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("step", "worker", "train", "features", "wire_dtype", "use_early")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    USE_EARLY_FIELD_NUMBER: _ClassVar[int]
    step: int
    worker: int
    train: bool
    features: _containers.RepeatedCompositeFieldContainer[FeatureBags]
    wire_dtype: str
    use_early: bool
    def __init__(self, step: _Optional[int] = ..., worker: _Optional[int] = ..., train: _Optional[bool] = ..., features: _Optional[_Iterable[_Union[FeatureBags, _Mapping]]] = ..., wire_dtype: _Optional[str] = ..., use_early: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("pooled",)
    POOLED_FIELD_NUMBER: _ClassVar[int]
    pooled: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, pooled: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class EarlyLookupRequest(_message.Message):
    __slots__ = ("step", "worker", "features", "correct")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    step: int
    worker: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureBags]
    correct: bool
    def __init__(self, step: _Optional[int] = ..., worker: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureBags, _Mapping]]] = ..., correct: _Optional[bool] = ...) -> None: ...

class EarlyLookupResponse(_message.Message):
    __slots__ = ("kept",)
    KEPT_FIELD_NUMBER: _ClassVar[int]
    kept: bool
    def __init__(self, kept: _Optional[bool] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("step", "indices")
    STEP_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    step: int
    indices: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, step: _Optional[int] = ..., indices: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PushGradientsRequest(_message.Message):
    __slots__ = ("step", "worker", "grads")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    step: int
    worker: int
    grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, step: _Optional[int] = ..., worker: _Optional[int] = ..., grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class PushGradientsResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    def __init__(self, applied: _Optional[bool] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("directory",)
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    directory: str
    def __init__(self, directory: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("manifest_json",)
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    manifest_json: str
    def __init__(self, manifest_json: _Optional[str] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("directory",)
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    directory: str
    def __init__(self, directory: _Optional[str] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("stats_json",)
    STATS_JSON_FIELD_NUMBER: _ClassVar[int]
    stats_json: str
    def __init__(self, stats_json: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("node_id", "applied_step")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    applied_step: int
    def __init__(self, node_id: _Optional[str] = ..., applied_step: _Optional[int] = ...) -> None: ...
