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

class KeyedJaggedTensor(_message.Message):
    __slots__ = ("keys", "stride", "lengths", "values", "weights", "mean_divisor")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MEAN_DIVISOR_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    stride: int
    lengths: TensorProto
    values: TensorProto
    weights: TensorProto
    mean_divisor: TensorProto
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., stride: _Optional[int] = ..., lengths: _Optional[_Union[TensorProto, _Mapping]] = ..., values: _Optional[_Union[TensorProto, _Mapping]] = ..., weights: _Optional[_Union[TensorProto, _Mapping]] = ..., mean_divisor: _Optional[_Union[TensorProto, _Mapping]] = ...) -> None: ...

class KeyedTensor(_message.Message):
    __slots__ = ("keys", "dims", "values")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    dims: _containers.RepeatedScalarFieldContainer[int]
    values: TensorProto
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., dims: _Optional[_Iterable[int]] = ..., values: _Optional[_Union[TensorProto, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("step", "worker", "train", "wire_dtype", "use_early", "bags", "push")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    USE_EARLY_FIELD_NUMBER: _ClassVar[int]
    BAGS_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    step: int
    worker: int
    train: bool
    wire_dtype: str
    use_early: bool
    bags: KeyedJaggedTensor
    push: PushGradientsRequest
    def __init__(self, step: _Optional[int] = ..., worker: _Optional[int] = ..., train: _Optional[bool] = ..., wire_dtype: _Optional[str] = ..., use_early: _Optional[bool] = ..., bags: _Optional[_Union[KeyedJaggedTensor, _Mapping]] = ..., push: _Optional[_Union[PushGradientsRequest, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("pooled",)
    POOLED_FIELD_NUMBER: _ClassVar[int]
    pooled: KeyedTensor
    def __init__(self, pooled: _Optional[_Union[KeyedTensor, _Mapping]] = ...) -> None: ...

class EarlyLookupRequest(_message.Message):
    __slots__ = ("step", "worker", "correct", "bags", "prefetch")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    BAGS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    step: int
    worker: int
    correct: bool
    bags: KeyedJaggedTensor
    prefetch: PrefetchRequest
    def __init__(self, step: _Optional[int] = ..., worker: _Optional[int] = ..., correct: _Optional[bool] = ..., bags: _Optional[_Union[KeyedJaggedTensor, _Mapping]] = ..., prefetch: _Optional[_Union[PrefetchRequest, _Mapping]] = ...) -> None: ...

class EarlyLookupResponse(_message.Message):
    __slots__ = ("kept", "every_row_resident")
    KEPT_FIELD_NUMBER: _ClassVar[int]
    EVERY_ROW_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    kept: bool
    every_row_resident: bool
    def __init__(self, kept: _Optional[bool] = ..., every_row_resident: _Optional[bool] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("step", "rows")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    step: int
    rows: KeyedJaggedTensor
    def __init__(self, step: _Optional[int] = ..., rows: _Optional[_Union[KeyedJaggedTensor, _Mapping]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("every_row_resident",)
    EVERY_ROW_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    every_row_resident: bool
    def __init__(self, every_row_resident: _Optional[bool] = ...) -> None: ...

class PushGradientsRequest(_message.Message):
    __slots__ = ("step", "worker", "grads")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    step: int
    worker: int
    grads: KeyedTensor
    def __init__(self, step: _Optional[int] = ..., worker: _Optional[int] = ..., grads: _Optional[_Union[KeyedTensor, _Mapping]] = ...) -> None: ...

class PushGradientsResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    def __init__(self, applied: _Optional[bool] = ...) -> None: ...
