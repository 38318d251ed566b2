from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "response", "messages")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "request_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    request_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("rewards", "normalized_rewards", "model_id", "request_id", "ensemble_spread")
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_REWARDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_SPREAD_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    normalized_rewards: _containers.RepeatedScalarFieldContainer[float]
    model_id: str
    request_id: str
    ensemble_spread: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rewards: _Optional[_Iterable[float]] = ..., normalized_rewards: _Optional[_Iterable[float]] = ..., model_id: _Optional[str] = ..., request_id: _Optional[str] = ..., ensemble_spread: _Optional[_Iterable[float]] = ...) -> None: ...

class BestOfNRequest(_message.Message):
    __slots__ = ("prompt", "candidates", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    candidates: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, prompt: _Optional[str] = ..., candidates: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class BestOfNResponse(_message.Message):
    __slots__ = ("rewards", "normalized_rewards", "best_index", "ranking", "model_id", "request_id", "ensemble_spread")
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_REWARDS_FIELD_NUMBER: _ClassVar[int]
    BEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_SPREAD_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    normalized_rewards: _containers.RepeatedScalarFieldContainer[float]
    best_index: int
    ranking: _containers.RepeatedScalarFieldContainer[int]
    model_id: str
    request_id: str
    ensemble_spread: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rewards: _Optional[_Iterable[float]] = ..., normalized_rewards: _Optional[_Iterable[float]] = ..., best_index: _Optional[int] = ..., ranking: _Optional[_Iterable[int]] = ..., model_id: _Optional[str] = ..., request_id: _Optional[str] = ..., ensemble_spread: _Optional[_Iterable[float]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "contract_version", "tokenizer_fingerprint", "reward_mean", "reward_std", "max_sequence_length", "max_items", "max_text_bytes", "ensemble_size", "preferred_rewards", "preferred_spread")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    REWARD_STD_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_REWARDS_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_SPREAD_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    contract_version: int
    tokenizer_fingerprint: str
    reward_mean: float
    reward_std: float
    max_sequence_length: int
    max_items: int
    max_text_bytes: int
    ensemble_size: int
    preferred_rewards: _containers.RepeatedScalarFieldContainer[float]
    preferred_spread: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model_id: _Optional[str] = ..., contract_version: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., reward_mean: _Optional[float] = ..., reward_std: _Optional[float] = ..., max_sequence_length: _Optional[int] = ..., max_items: _Optional[int] = ..., max_text_bytes: _Optional[int] = ..., ensemble_size: _Optional[int] = ..., preferred_rewards: _Optional[_Iterable[float]] = ..., preferred_spread: _Optional[_Iterable[float]] = ...) -> None: ...
