from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_FORMAT_UNSPECIFIED: _ClassVar[TokenFormat]
    TOKEN_FORMAT_FP32: _ClassVar[TokenFormat]
    TOKEN_FORMAT_BF16: _ClassVar[TokenFormat]
    TOKEN_FORMAT_FP8: _ClassVar[TokenFormat]
TOKEN_FORMAT_UNSPECIFIED: TokenFormat
TOKEN_FORMAT_FP32: TokenFormat
TOKEN_FORMAT_BF16: TokenFormat
TOKEN_FORMAT_FP8: TokenFormat

class TokenBatch(_message.Message):
    __slots__ = ("format", "num_tokens", "hidden", "data", "scales")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    format: TokenFormat
    num_tokens: int
    hidden: int
    data: bytes
    scales: bytes
    def __init__(self, format: _Optional[_Union[TokenFormat, str]] = ..., num_tokens: _Optional[int] = ..., hidden: _Optional[int] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ...) -> None: ...

class ExpertForwardRequest(_message.Message):
    __slots__ = ("layer", "tokens", "slots", "expert_ids", "expert_weights", "result_format")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tokens: TokenBatch
    slots: int
    expert_ids: bytes
    expert_weights: bytes
    result_format: TokenFormat
    def __init__(self, layer: _Optional[int] = ..., tokens: _Optional[_Union[TokenBatch, _Mapping]] = ..., slots: _Optional[int] = ..., expert_ids: _Optional[bytes] = ..., expert_weights: _Optional[bytes] = ..., result_format: _Optional[_Union[TokenFormat, str]] = ...) -> None: ...

class ExpertForwardResponse(_message.Message):
    __slots__ = ("result", "compute_seconds")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    result: TokenBatch
    compute_seconds: float
    def __init__(self, result: _Optional[_Union[TokenBatch, _Mapping]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class WorkerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("model_type", "expert_ids", "moe_layers", "hidden_size", "num_experts", "precision", "device", "resident_weight_bytes", "expert_tokens")
    class ExpertTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    moe_layers: _containers.RepeatedScalarFieldContainer[int]
    hidden_size: int
    num_experts: int
    precision: str
    device: str
    resident_weight_bytes: int
    expert_tokens: _containers.ScalarMap[int, int]
    def __init__(self, model_type: _Optional[str] = ..., expert_ids: _Optional[_Iterable[int]] = ..., moe_layers: _Optional[_Iterable[int]] = ..., hidden_size: _Optional[int] = ..., num_experts: _Optional[int] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., resident_weight_bytes: _Optional[int] = ..., expert_tokens: _Optional[_Mapping[int, int]] = ...) -> None: ...
