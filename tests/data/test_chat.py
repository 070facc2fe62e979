"""Chat data: rendering and assistant masks against the tokenizer's own apply_chat_template, ShareGPT
conversion, chat shards with their label mask, overlong conversations, and bad input (nothing written)."""

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from longloom.data.arrow import INDEX_FILE, TokenShards
from longloom.data.chat import ChatRenderer, conversation_messages
from longloom.data.prepare import prepare_dataset

# ChatML without a trailing newline after a turn, so that the template with generation tags marks
# exactly what the prefix rendering finds: the assistant content and its <|im_end|>.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hello, how are you?"},
    {"role": "assistant", "content": "hi there, I am fine"},
    {"role": "user", "content": "and the world?"},
    {"role": "assistant", "content": "fine as well"},
]
SHAREGPT = [
    {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
    for m in CONVERSATION
]


def _save_tokenizer(folder, template):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = " ".join(m["content"] for m in CONVERSATION) + " system user assistant"
    tokenizer.train_from_iterator([text] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", chat_template=template
    )
    fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    plain = _save_tokenizer(root / "plain", PLAIN_TEMPLATE)
    tagged = _save_tokenizer(root / "tagged", GENERATION_TEMPLATE)
    _save_tokenizer(root / "none", None)
    return root, plain, tagged


def test_prefix_rendering_matches_the_templates_own_tokens_and_generation_mask(tokenizers_dir):
    root, plain, tagged = tokenizers_dir
    renderer = ChatRenderer(root / "plain")
    assert not renderer.uses_generation_tags
    rendered = renderer.render(CONVERSATION, "test")
    own = plain.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert rendered.ids.tolist() == list(own)
    # The same template with {% generation %} tags: transformers' own mask is the reference.
    reference = tagged.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert list(reference["input_ids"]) == list(own)
    assert rendered.assistant_mask.tolist() == [bool(x) for x in reference["assistant_masks"]]
    answers = plain.decode(rendered.ids[rendered.assistant_mask].tolist())
    assert answers == "hi there, I am fine<|im_end|>fine as well<|im_end|>"


def test_generation_tags_are_used_when_the_template_has_them(tokenizers_dir):
    root, _, tagged = tokenizers_dir
    renderer = ChatRenderer(root / "tagged")
    assert renderer.uses_generation_tags
    rendered = renderer.render(CONVERSATION, "test")
    reference = tagged.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert rendered.ids.tolist() == list(reference["input_ids"])
    assert rendered.assistant_mask.tolist() == [bool(x) for x in reference["assistant_masks"]]
    assert rendered.assistant_mask.sum() > 0


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_fix(tmp_path):
    # Like templates that drop the reasoning of earlier answers: a turn renders differently once followed.
    rewriting = PLAIN_TEMPLATE.replace(
        "{{ m['content'] }}",
        "{% if m['role'] == 'assistant' and not loop.last %}[answered]{% else %}{{ m['content'] }}{% endif %}",
    )
    _save_tokenizer(tmp_path / "rewriting", rewriting)
    with pytest.raises(ValueError, match=r"line 7: .* up to turn 2 differently.*add \{% generation %\}"):
        ChatRenderer(tmp_path / "rewriting").render(CONVERSATION, "line 7")
    assert ChatRenderer(tmp_path / "rewriting").render(CONVERSATION[:3], "line 7").assistant_mask.any()


def test_sharegpt_maps_to_openai_roles():
    assert conversation_messages({"conversations": SHAREGPT}, "x") == CONVERSATION
    assert conversation_messages({"messages": CONVERSATION}, "x") == CONVERSATION


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" if r is not None else "\n" for r in records))


def test_prepare_chat_keeps_one_masked_document_per_conversation(tokenizers_dir, tmp_path):
    root, plain, _ = tokenizers_dir
    source = tmp_path / "chats.jsonl"
    short = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    no_answer = [{"role": "user", "content": "hello"}]
    _write_jsonl(
        source,
        [{"messages": CONVERSATION}, None, {"conversations": SHAREGPT}, {"messages": no_answer}]
        + [{"messages": short}] * 6,
    )
    # Small shards: documents and their masks spread over several files.
    summary = prepare_dataset(
        source,
        tmp_path / "out",
        tokenizer=str(root / "plain"),
        format="chat",
        shard_tokens=40,
        progress=False,
    )
    shards = TokenShards(tmp_path / "out")
    assert shards.has_label_mask and json.loads((tmp_path / "out" / INDEX_FILE).read_text())["label_mask"]
    assert summary["documents"] == shards.num_documents == 8 and summary["shards"] > 1
    assert summary["skipped_empty"] == 1 and summary["skipped_no_assistant_tokens"] == 1
    renderer = ChatRenderer(root / "plain")
    expected = [renderer.render(CONVERSATION, "x")] * 2 + [renderer.render(short, "x")] * 6
    masks = []
    for index, rendered in enumerate(expected):
        ids = shards.document(index)
        assert ids.tolist() == rendered.ids.tolist() + [plain.eos_token_id]
        mask = shards.document_label_mask(index)
        assert mask.tolist() == rendered.assistant_mask.tolist() + [False]
        masks.append(mask)
    stream = np.concatenate(masks)
    assert shards.label_mask(3, shards.num_tokens).tolist() == stream[3:].tolist()
    assert summary["trained_tokens"] == int(stream.sum())


def test_overlong_conversations_error_skip_or_truncate(tokenizers_dir, tmp_path):
    root, plain, _ = tokenizers_dir
    source = tmp_path / "chats.jsonl"
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    _write_jsonl(source, [{"messages": short}, {"messages": CONVERSATION}])
    renderer = ChatRenderer(root / "plain")
    full = renderer.render(CONVERSATION, "x")
    # Cut inside the first answer: the truncated conversation keeps some assistant tokens.
    limit = max(len(renderer.render(short, "x").ids) + 1, int(np.argmax(full.assistant_mask)) + 3)
    long_length = len(full.ids) + 1
    assert limit < long_length
    common = {"tokenizer": str(root / "plain"), "format": "chat", "max_tokens": limit, "progress": False}
    with pytest.raises(
        ValueError, match=rf"chats.jsonl:2: the conversation is {long_length} tokens.*--overlong"
    ):
        prepare_dataset(source, tmp_path / "refused", **common)
    assert not (tmp_path / "refused").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".refused")] == []
    with pytest.raises(ValueError, match=r"--overlong skip says .* pass --max-tokens N"):
        prepare_dataset(source, tmp_path / "refused", **(common | {"max_tokens": None}), overlong="skip")
    skipped = prepare_dataset(source, tmp_path / "skip", overlong="skip", **common)
    assert skipped["documents"] == 1 and skipped["skipped_overlong"] == 1
    cut = prepare_dataset(source, tmp_path / "cut", overlong="truncate", **common)
    assert (
        cut["documents"] == 2 and cut["truncated_overlong"] == 1 and cut["skipped_no_assistant_tokens"] == 0
    )
    # Cut before its first answer, a conversation has nothing to train on: skipped, not counted as truncated.
    before_answer = common | {"max_tokens": int(np.argmax(full.assistant_mask)) + 1}
    _write_jsonl(source, [{"messages": short}, {"messages": CONVERSATION}, {"messages": short}])
    early = prepare_dataset(source, tmp_path / "early", overlong="truncate", **before_answer)
    assert early["truncated_overlong"] == 0 and early["skipped_no_assistant_tokens"] == 1
    _write_jsonl(source, [{"messages": short}, {"messages": CONVERSATION}])
    shards = TokenShards(tmp_path / "cut")
    assert shards.document(1).tolist() == full.ids[: limit - 1].tolist() + [plain.eos_token_id]
    assert shards.document_label_mask(1).tolist() == full.assistant_mask[: limit - 1].tolist() + [False]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"text": "no conversation"}, r"chats.jsonl:2 has neither 'messages'.*'conversations'.*keys: 'text'"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            r"chats.jsonl:2: messages\[0\] has role 'robot', not one of 'system', 'user', 'assistant'",
        ),
        (
            {"conversations": [{"from": "bot", "value": "x"}]},
            r"chats.jsonl:2: conversations\[0\] has from 'bot', not one of .*'human'.*'gpt'",
        ),
        ({"messages": [{"role": "user"}]}, r"chats.jsonl:2: messages\[0\] .* must be an object with 'role'"),
        ({"messages": []}, r"chats.jsonl:2: 'messages' must be a non-empty list"),
    ],
)
def test_bad_lines_name_the_line_and_the_value_and_write_nothing(tokenizers_dir, tmp_path, record, message):
    root, _, _ = tokenizers_dir
    source = tmp_path / "chats.jsonl"
    _write_jsonl(source, [{"messages": CONVERSATION}, record])
    with pytest.raises(ValueError, match=message):
        prepare_dataset(
            source, tmp_path / "out", tokenizer=str(root / "plain"), format="chat", progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.jsonl"]


def test_tokenizer_without_chat_template_or_bytes_is_refused(tokenizers_dir, tmp_path):
    root, _, _ = tokenizers_dir
    source = tmp_path / "chats.jsonl"
    _write_jsonl(source, [{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match=r"has no chat template.*chat/instruct model"):
        prepare_dataset(source, tmp_path / "out", tokenizer=str(root / "none"), format="chat", progress=False)
    with pytest.raises(ValueError, match=r"--format chat needs a Hugging Face tokenizer"):
        prepare_dataset(source, tmp_path / "out", format="chat", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.jsonl"]


def test_text_folders_have_no_mask_and_train_on_every_token(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    prepare_dataset(tmp_path / "a.txt", tmp_path / "out", progress=False)
    shards = TokenShards(tmp_path / "out")
    assert not shards.has_label_mask
    assert shards.label_mask(0, shards.num_tokens).all() and shards.document_label_mask(0).all()
