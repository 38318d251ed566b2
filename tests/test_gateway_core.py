"""The gateway's text → tokens step, against the training code's encoding."""
import pytest

from tribune.services.common.text import encode_pair
from tribune.services.contract import ServedFacts
from tribune.services.common.config import build_config
from tribune.services.common.errors import UserError
from tribune.services.gateway_core import GatewayConfig, InvalidInput, Item, Tokenisation

# what a repository serves: the reward model was trained with 64 tokens, prompts cut to 48
FACTS = ServedFacts(contract_version=1, tokenizer_fingerprint="f", reward_mean=0.0, reward_std=1.0,
                    max_sequence_length=64, vocab_size=100, max_batch_size=8, reward_model_id="rm-x",
                    max_length=64, max_prompt_length=48)


@pytest.fixture()
def tok(task_dir, tmp_path):
    repo = tmp_path / "repo"
    (repo / "tokenizer").mkdir(parents=True)
    for f in (task_dir / "tokenizer").iterdir():
        (repo / "tokenizer" / f.name).write_bytes(f.read_bytes())
    return Tokenisation(repo, GatewayConfig(repository=repo, triton_url="127.0.0.1:1", max_items=3,
                                            max_text_bytes=40))


def test_prompt_response_encodes_like_training(tok):
    ids = tok.encode(Item("name two fruits", "fig kiwi"), FACTS)
    assert ids == encode_pair(tok.tokenizer, "name two fruits", "fig kiwi", 48, 64)[0]


def test_messages_use_the_chat_template(tok):
    tok.tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                                   "{% if add_generation_prompt %}{% endif %}")
    item = Item(None, None, (("user", "name two"), ("user", "fruits"), ("assistant", "fig kiwi")))
    tok.validate([item])
    assert tok.encode(item, FACTS) == tok.encode(Item("name two fruits", "fig kiwi"), FACTS)


def test_an_empty_response_is_scored_as_prompt_and_eos(tok):
    """As the token path scores a policy that stops at once (proto3: unset and empty are one)."""
    tok.validate([Item("name two fruits", None)])
    assert tok.encode(Item("name two fruits", None), FACTS) == tok.tokenizer("name two fruits")["input_ids"] + [
        tok.tokenizer.eos_token_id]


def test_validation_names_the_field(tok):
    with pytest.raises(InvalidInput, match=r"items\[1\]\.response is longer"):
        tok.validate([Item("a", "b"), Item("a", "é" * 21)])
    with pytest.raises(InvalidInput, match=r"items\[2\]\.prompt") as err:
        tok.validate([Item("a", "b")] * 2 + [Item(None, "b")])
    assert err.value.field == "items[2].prompt"          # sent as a google.rpc.BadRequest field violation
    tok.validate([Item("a", ""), Item("a", None)])        # an empty response is valid: scored as prompt + EOS
    assert tok.encode(Item("a", ""), FACTS) == tok.encode(Item("a", None), FACTS)
    assert tok.encode(Item("a", ""), FACTS)[-1] == tok.tokenizer.eos_token_id
    with pytest.raises(InvalidInput, match="limit is 3"):
        tok.validate([Item("a", "b")] * 4)
    with pytest.raises(InvalidInput, match=r"items\[0\]\.prompt is longer than 40 bytes"):
        tok.validate([Item("é" * 21, "b")])
    with pytest.raises(InvalidInput, match="last message must be the assistant"):
        tok.validate([Item(None, None, (("user", "hi"),))])
    with pytest.raises(InvalidInput, match=r"items\[0\]\.messages: a conversation needs at least one turn"):
        tok.validate([Item(None, None, (("assistant", "fig kiwi"),))])     # would reach the template empty
    tok.validate([Item("name two fruits", "fig \ufffd")])                 # U+FFFD is valid text (invalid
    # UTF-8 never parses: the request is refused as malformed, test_gateway.py)


def test_a_conversation_the_chat_template_refuses_is_the_callers_error(tok):
    """Llama-2 and Mistral templates raise on roles that do not alternate: INVALID_ARGUMENT naming
    the item, not INTERNAL."""
    tok.tokenizer.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                                   "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                                   "{{ m['content'] }} {% endfor %}")
    ok = Item(None, None, (("user", "name two fruits"), ("assistant", "fig kiwi")))
    assert tok.encode(ok, FACTS, "items[0]")
    bad = Item(None, None, (("user", "name two"), ("user", "fruits"), ("assistant", "fig kiwi")))
    tok.validate([ok, bad])                                     # the shape is fine; the template decides
    with pytest.raises(InvalidInput, match=r"items\[1\]\.messages: .*roles must alternate") as err:
        tok.encode(bad, FACTS, "items[1]")
    assert err.value.field == "items[1].messages"


def test_a_prompt_limit_must_leave_the_served_model_room_for_a_response():
    """At or past the model's max_length a long prompt would fill the sequence: Triton refuses it (and
    with it every request batched with it), or, cut, every response scores alike. Refused at start
    (test_gateway.py, through the command) and when Triton comes back with another model."""
    from tribune.services.contract import ContractError
    from tribune.services.gateway_core import check_prompt_limit

    config = lambda n: GatewayConfig(repository=".", triton_url="127.0.0.1:1", max_prompt_length=n)   # noqa: E731
    check_prompt_limit(config(None), FACTS)                 # the model's own setting
    check_prompt_limit(config(FACTS.max_length - 1), FACTS)
    for n in (FACTS.max_length, 100):
        with pytest.raises(ContractError, match=f"--max-prompt-length {n} leaves no room for a response"):
            check_prompt_limit(config(n), FACTS)


def test_queue_smaller_than_a_request_is_refused():
    with pytest.raises(UserError, match=r"max_queue_items \(8\) must be at least max_items \(64\)"):
        build_config(GatewayConfig, {"repository": ".", "triton_url": "127.0.0.1:1", "max_items": 64,
                                     "max_queue_items": 8})
