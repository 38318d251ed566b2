"""The wire contract, version 1: the one module that owns model names, tensors and dtypes.

The exporter, the embedded server, the client library and the gateway all import it, so
a change here is a change everywhere (and a contract-version bump). Dims exclude the
batch dimension: both models are batched (max_batch_size > 0).

``reward``:    input_ids INT64 [-1], attention_mask INT64 [-1] → rewards FP32 [1],
               the raw score at the last position whose mask is 1. A repository of an
               ensemble of K reward models (``ServedFacts.ensemble_size`` K > 1) serves
               ``rewards`` as the members' mean and adds member_rewards FP32 [K], the
               members' raw scores (B, K). An added output, not a changed one: v1 clients
               ask for ``rewards`` only and see what they always saw (a single reward
               model has no member_rewards, so its repository is exactly v1 as before).
``reference``: input_ids INT64 [-1], attention_mask INT64 [-1], temperature FP32 [1]
               → logprobs FP32 [-1] of shape (B, T−1): column t−1 holds
               log π_ref(input_ids[t] | input_ids[<t]) with logits / temperature,
               and 0 where attention_mask[t] is 0 (and for each row's first real
               token, which has no context: a padded row gives exactly the columns of
               the same row unpadded).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

CONTRACT_VERSION = 1
MANIFEST_FILE = "tribune.json"
TOKENIZER_DIR = "tokenizer"

REWARD_MODEL = "reward"
REFERENCE_MODEL = "reference"
# A third, unbatched model that answers with the contract facts a remote client must check
# (tokenizer fingerprint, reward statistics, limits) as one JSON string. Triton's model
# config `parameters` would be the natural place, but the Python backend behind the embedded
# server drops custom parameters, and clients must be able to check both servers alike.
MANIFEST_MODEL = "tribune_manifest"

# Keys of the Triton model config `parameters` map: stock Triton returns them in the model
# config, so any client can see which contract and tokenizer a model speaks. The full facts
# (reward statistics included) are served by MANIFEST_MODEL.
PARAM_CONTRACT_VERSION = "tribune_contract_version"
PARAM_TOKENIZER_FINGERPRINT = "tribune_tokenizer_fingerprint"
PARAM_MAX_SEQUENCE_LENGTH = "tribune_max_sequence_length"
PARAM_VOCAB_SIZE = "tribune_vocab_size"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                 # Triton dtype name
    dims: tuple[int, ...]      # without the batch dimension; -1 is variable

    @property
    def numpy_dtype(self) -> type:
        return {"INT64": np.int64, "FP32": np.float32, "FP16": np.float16, "BYTES": np.object_}[self.dtype]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


INPUT_IDS = TensorSpec("input_ids", "INT64", (-1,))
ATTENTION_MASK = TensorSpec("attention_mask", "INT64", (-1,))
TEMPERATURE = TensorSpec("temperature", "FP32", (1,))
# the lowest temperature `reference` accepts: logits divided by less overflow (NaN log-probs)
MIN_TEMPERATURE = 1e-3
REWARDS = TensorSpec("rewards", "FP32", (1,))
MEMBER_REWARDS_NAME = "member_rewards"
LOGPROBS = TensorSpec("logprobs", "FP32", (-1,))

PROBE = TensorSpec("probe", "INT64", (1,))
MANIFEST = TensorSpec("manifest", "BYTES", (1,))
# JSON {file name: base64 content} of the repository's tokenizer/: lets a text client that has
# no copy of the repository (e.g. `tribune score`) tokenise exactly as the models were trained.
TOKENIZER_FILES = TensorSpec("tokenizer_files", "BYTES", (1,))

REWARD = ModelSpec(REWARD_MODEL, (INPUT_IDS, ATTENTION_MASK), (REWARDS,))
MANIFEST_SPEC = ModelSpec(MANIFEST_MODEL, (PROBE,), (MANIFEST, TOKENIZER_FILES))
REFERENCE = ModelSpec(REFERENCE_MODEL, (INPUT_IDS, ATTENTION_MASK, TEMPERATURE), (LOGPROBS,))
# the single-reward-model contract; an ensemble's `reward` is ``reward_spec(K)``
MODELS: dict[str, ModelSpec] = {REWARD.name: REWARD, REFERENCE.name: REFERENCE}


def member_rewards_spec(ensemble_size: int) -> TensorSpec:
    """member_rewards FP32 [K]: the K members' raw scores, (B, K) with the batch dim.

    K is fixed per repository (Triton configs need a fixed dim to say what a column means).
    """
    return TensorSpec(MEMBER_REWARDS_NAME, "FP32", (int(ensemble_size),))


def reward_spec(ensemble_size: int = 1) -> ModelSpec:
    """The `reward` model of a repository of K reward models: REWARD itself for K = 1."""
    if ensemble_size < 1:
        raise ValueError("ensemble_size must be at least 1")
    if ensemble_size == 1:
        return REWARD
    return ModelSpec(REWARD_MODEL, REWARD.inputs, (REWARDS, member_rewards_spec(ensemble_size)))


class ContractError(Exception):
    """A server, repository or request does not follow the wire contract."""


@dataclass(frozen=True)
class ServedFacts:
    """What a served repository tells its clients: ``tribune.json["served"]``, answered by the
    `tribune_manifest` model. The one home of the reward statistics of a repository.

    ``reward_mean``/``reward_std``: statistics of the served ``rewards`` on responses sampled
    from πSFT (normalisation); for an ensemble, of the members' mean (see the export for
    whether they were measured or derived from the members' own);
    ``max_length``/``max_prompt_length``: the truncation the reward model was trained with
    (prompt + response + EOS tokens; prompt tokens kept, cut from the left), so text
    clients encode exactly as training did;
    ``ensemble_size``: K, the reward models behind `reward` (K > 1 serves member_rewards);
    ``member_reward_mean``/``member_reward_std``: each member's own statistics on SFT
    samples, (K,): members differ by offset and scale, so disagreement is only meaningful
    on scores standardised with them. For K = 1 they are (reward_mean,), (reward_std,).
    ``preferred_member_scores``: (rows, K) the members' raw scores of the responses ranked first in
    up to 256 rows of the reward model's held-out preferences — how high it rates what raters
    preferred, the height PPO's gold-free monitor measures its proxy against; empty when the
    reward model was saved without them.
    ``models``: the contract models this repository serves, `reward`, `reference` or both
    (a reward model of another family than the policy is exported and served on its own,
    with its own tokenizer). The reward fields (statistics, id, truncation) are None in a
    repository without `reward`. ``tokenizer_fingerprint`` is that of the repository's own
    tokenizer/, which every model it serves was trained with.
    """
    contract_version: int
    tokenizer_fingerprint: str
    max_sequence_length: int
    vocab_size: int
    max_batch_size: int
    reward_mean: float | None = None
    reward_std: float | None = None
    reward_model_id: str | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None
    reward_model_source: str = ""
    ensemble_size: int = 1
    member_reward_mean: tuple[float, ...] = ()
    member_reward_std: tuple[float, ...] = ()
    preferred_member_scores: tuple[tuple[float, ...], ...] = ()
    models: tuple[str, ...] = (REWARD_MODEL, REFERENCE_MODEL)
    reference_model_source: str = ""

    def __post_init__(self) -> None:
        models = tuple(str(m) for m in self.models)
        if not models or len(set(models)) != len(models) or set(models) - set(MODELS):
            raise ValueError(f"models must be one or both of {sorted(MODELS)}, got {list(models)}")
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "ensemble_size", int(self.ensemble_size))
        reward_fields = ("reward_mean", "reward_std", "reward_model_id", "max_length", "max_prompt_length")
        if REWARD_MODEL not in models:
            given = [f for f in reward_fields if getattr(self, f) is not None]
            if given or self.ensemble_size != 1 or self.member_reward_mean or self.member_reward_std \
                    or self.preferred_member_scores:
                raise ValueError("a repository without `reward` has no reward facts, "
                                 f"got {given or 'member statistics'}")
            return
        missing = [f for f in reward_fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a repository serving `reward` needs {', '.join(missing)}")
        # a single reward model is its own only member; repositories exported before
        # ensembles carry no member statistics
        if self.ensemble_size == 1 and not self.member_reward_mean and not self.member_reward_std:
            object.__setattr__(self, "member_reward_mean", (float(self.reward_mean),))
            object.__setattr__(self, "member_reward_std", (float(self.reward_std),))
        object.__setattr__(self, "member_reward_mean", tuple(float(m) for m in self.member_reward_mean))
        object.__setattr__(self, "member_reward_std", tuple(float(s) for s in self.member_reward_std))
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be at least 1, got {self.ensemble_size}")
        if not len(self.member_reward_mean) == len(self.member_reward_std) == self.ensemble_size:
            raise ValueError(f"member_reward_mean and member_reward_std need ensemble_size = {self.ensemble_size} "
                             f"entries, got {len(self.member_reward_mean)} and {len(self.member_reward_std)}")
        if not all(s > 0 for s in self.member_reward_std):
            raise ValueError("member_reward_std must be positive")
        malformed = f"preferred_member_scores must be rows of {self.ensemble_size} finite numbers"
        try:
            preferred = tuple(tuple(float(x) for x in row) for row in self.preferred_member_scores)
        except TypeError:
            raise ValueError(malformed) from None
        if any(len(row) != self.ensemble_size or not all(math.isfinite(x) for x in row) for row in preferred):
            raise ValueError(malformed)
        object.__setattr__(self, "preferred_member_scores", preferred)

    @classmethod
    def parse(cls, data: dict | str | bytes) -> "ServedFacts":
        """From the manifest model's JSON (or a dict); raises ContractError naming what is wrong."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise ContractError(f"served facts are not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ContractError("served facts must be a JSON object")
        if data.get("contract_version") != CONTRACT_VERSION:
            raise ContractError(f"contract v{data.get('contract_version')}, this Tribune speaks v{CONTRACT_VERSION}")
        data = dict(data)
        if REWARD_MODEL in data.get("models", MODELS):
            # repositories exported before the truncation policy was served: the old client rule
            data.setdefault("max_length", data.get("max_sequence_length"))
            if data.get("max_length") is not None:
                data.setdefault("max_prompt_length", (3 * int(data["max_length"])) // 4)
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and data.get(f.name) is None]
        if missing:
            raise ContractError(f"served facts lack {', '.join(missing)}")
        try:
            facts = cls(**{k: v for k, v in data.items() if k in names})
            ints = {k: int(getattr(facts, k)) for k in ("max_sequence_length", "vocab_size", "max_batch_size",
                                                        "max_length", "max_prompt_length")
                    if getattr(facts, k) is not None}
            floats = {k: float(getattr(facts, k)) for k in ("reward_mean", "reward_std")
                      if getattr(facts, k) is not None}
            return dataclasses.replace(facts, **ints, **floats)
        except (TypeError, ValueError) as e:
            raise ContractError(f"served facts are malformed: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def normalise(self, rewards):
        """(r − mean) / std with the repository's statistics (rewards of πSFT samples).

        Any array type (numpy, torch) of raw rewards, returned as the same type.
        """
        self.require(REWARD_MODEL)
        return (rewards - self.reward_mean) / self.reward_std

    @property
    def preferred_rewards(self) -> tuple[float, ...]:
        """(rows,) the served `rewards` (the members' mean) of the preferred held-out responses:
        what the gateway's ModelInfo carries, as it serves one score per item."""
        return tuple(sum(row) / len(row) for row in self.preferred_member_scores)

    @property
    def preferred_spread(self) -> tuple[float, ...]:
        """(rows,) the members' disagreement on those responses (``member_spread``; 0 for one member):
        with ``preferred_rewards``, what a gateway client needs to rate them as PPO's objective does."""
        if not self.preferred_member_scores:
            return ()
        return tuple(float(x) for x in self.member_spread(np.asarray(self.preferred_member_scores, np.float64)))

    def require(self, *names: str) -> None:
        """Raises ContractError unless this repository serves every model in ``names``."""
        missing = [n for n in names if n not in self.models]
        if missing:
            raise ContractError(f"this repository serves only {', '.join(self.models)}, not {', '.join(missing)}; "
                                f"export it with `tribune export --{missing[0]} DIR`")

    def model_spec(self, name: str) -> ModelSpec:
        """The contract of model ``name`` as this repository serves it (``reward_spec(K)`` for `reward`)."""
        return reward_spec(self.ensemble_size) if name == REWARD_MODEL else MODELS[name]

    def standardise_members(self, scores):
        """Each member's raw scores standardised with its own SFT-sample statistics.

        ``scores`` of shape (B, K), any array type (numpy, torch), returned as the same type:
        column k is (scores[:, k] − member_reward_mean[k]) / member_reward_std[k].
        """
        if scores.shape[-1] != self.ensemble_size:
            raise ContractError(f"member scores have {scores.shape[-1]} columns, the ensemble has {self.ensemble_size}")
        if hasattr(scores, "new_tensor"):       # torch, without importing it here
            mean, std = scores.new_tensor(self.member_reward_mean), scores.new_tensor(self.member_reward_std)
        else:
            mean, std = np.asarray(self.member_reward_mean), np.asarray(self.member_reward_std)
        return (scores - mean) / std

    def member_spread(self, scores):
        """The members' disagreement per row: std over the K members (population, so 0 for K = 1)
        of the standardised scores. (B, K) raw member scores -> (B,), any array type.

        Never computed on raw scores: members differ by offset and scale, not only by opinion.
        """
        z = self.standardise_members(scores)                                 # (B, K)
        return (((z - z.mean(-1)[..., None]) ** 2).mean(-1)) ** 0.5            # (B,)


def check_metadata(spec: ModelSpec, metadata: dict) -> None:
    """Compares Triton model metadata (as a dict, from get_model_metadata) with the contract.

    Triton reports batched dims with a leading -1; that dim is dropped before comparing.
    Tensors the server has beyond the spec's are allowed (how v1 clients that know only
    ``rewards`` keep working with an ensemble's `reward`, which adds member_rewards).
    """
    batched = spec.name != MANIFEST_MODEL

    def _tensors(key: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {t["name"]: (t["datatype"], tuple(int(d) for d in t.get("shape", []))[1 if batched else 0:])
                for t in metadata.get(key, [])}

    for key, expected in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        got = _tensors(key)
        for t in expected:
            if t.name not in got:
                raise ContractError(f"model {spec.name!r}: {key[:-1]} {t.name!r} is missing (server has "
                                    f"{sorted(got)}); is this a Tribune contract v{CONTRACT_VERSION} repository?")
            dtype, dims = got[t.name]
            if dtype != t.dtype or dims != t.dims:
                raise ContractError(f"model {spec.name!r}: {key[:-1]} {t.name!r} is {dtype}{list(dims)}, "
                                    f"the contract says {t.dtype}{list(t.dims)}")
