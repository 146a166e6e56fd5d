"""The built-in tiny model's tokenizer: byte-level BPE made in code (no files, no hub), so
string prompts, chat templates and the server work with `--model tiny`.

Its 512 ids match `TINY_CONFIG`: 0 `<pad>`, 1 `<s>` (bos), 2 `</s>` (eos), 3-6 the chat
markers, then the 256 byte symbols of GPT-2's byte-level alphabet (any UTF-8 text encodes),
then a fixed list of merges (a space before a letter or digit, and common English letter
pairs); the ids left over are reserved special tokens, which decode to nothing.
"""

from __future__ import annotations

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Each message as <|role|>content<|end|>, after the bos token; the reply follows <|assistant|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_SPACE = "\u0120"  # the byte-level alphabet's symbol for " "
_LETTER_PAIRS = ("th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co "
                 "me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur ca el ta la ns di fo ho pe ec pr no ct us "
                 "ac ot il tr ly nc et ut ss so rs un lo wa ge ie wh ee wi em ad ol rt po we na ul ni ts mo ow pa "
                 "im mi ai sh ir su id os iv ia am fi ci vi pl ig tu ev ld ry mp fe bl ab gh ty op wo sa ay ex ke "
                 "fr oo av ag if ap gr od bo sp rd do uc bu ei ov by rm ep tt oc fa ef cu rn sc gi da yo cr cl du "
                 "ga qu ue ff ba ey ls va um pp ua up lu go ht ru ug ds lt pi rc rr eg au ck ew mu br bi pt ak pu "
                 "ui rg ib tl ny ki rk ys ob mm fu ph og ms ye ud mb ip ub oi rl gu dr hr cc tw ft wn nu")


def _merges() -> list[tuple[str, str]]:
    spaced = [(_SPACE, c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    return spaced + [(pair[0], pair[1]) for pair in _LETTER_PAIRS.split()]


def tiny_tokenizer():
    """A `transformers.PreTrainedTokenizerFast` of exactly `VOCAB_SIZE` ids, with bos/eos/pad
    1/2/0 and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 symbols, one per byte
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    merges = []
    for left, right in _merges():
        if len(vocab) == VOCAB_SIZE:
            break
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    reserved = [f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - len(vocab))]
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", additional_special_tokens=list(SPECIAL_TOKENS[3:]) + reserved,
                                        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    return tokenizer
