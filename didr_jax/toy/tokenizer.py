"""Small byte-level BPE tokenizers built offline (nothing downloaded): a CLIP one (the toy
UNet's) and a Qwen3-style one with a chat template (the toy DiT's and the tiny Z-Image tests').

Single bytes are tokens, and each word of ``words`` becomes one token through merges, so a
closed grammar (the toy world's prompts) tokenizes one token per word while any other text
still tokenizes (byte by byte). Both load with transformers' ``AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
import shutil


def _byte_chars() -> list[str]:
  """GPT-2's byte -> unicode table (the alphabet of CLIP's byte-level BPE)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def write_clip_tokenizer(folder: str, words: tuple[str, ...] = (), max_length: int = 16) -> int:
  """Writes a CLIP byte-level BPE tokenizer with single-byte tokens plus whole-word tokens for
  ``words`` (built by merges). Returns the vocabulary size."""
  from transformers import CLIPTokenizer
  os.makedirs(folder, exist_ok=True)
  vocab: dict[str, int] = {}
  for c in _byte_chars():
    vocab[c] = len(vocab)
  for c in _byte_chars():
    vocab[c + "</w>"] = len(vocab)
  merges = learn_merges(words)
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  tmp = os.path.join(folder, "_src")
  os.makedirs(tmp, exist_ok=True)
  with open(os.path.join(tmp, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(tmp, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  tok = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                      model_max_length=max_length)
  tok.save_pretrained(folder)
  shutil.rmtree(tmp)
  return len(vocab)


# Qwen3's chat template as Z-Image applies it (``enable_thinking`` honoured), reduced to the
# fields a one-message prompt uses.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")


def qwen_tokenizer(words: tuple[str, ...] = ()):
  """A Qwen3-style byte-level BPE (GPT-2 byte alphabet, no prefix space) with Qwen's special
  tokens and chat template. Each word of ``words`` is one token, with or without a leading
  space ("red" and " red"). Returns a transformers ``PreTrainedTokenizerFast``; vocabulary
  size 256 + merges + 3 special tokens."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  space = "\u0120"  # the byte-level alphabet's symbol for " "
  merges = learn_merges([w for w in words] + [space + w for w in words], end="")
  vocab = {c: i for i, c in enumerate(alphabet)}
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
      additional_special_tokens=["<|im_start|>"])
  hf.chat_template = QWEN_CHAT_TEMPLATE
  return hf


def learn_merges(words, end: str = "</w>") -> list[tuple[str, str]]:
  """Byte-pair merges learned on ``words`` (each counted once) until every word is one token;
  ``end`` marks a word's last symbol (CLIP's "</w>"; "" for GPT-2 / Qwen style BPE).

  Applying learned merges in rank order reproduces the learning-time segmentation, so each word
  of the list tokenizes to exactly one token (hand-written per-word merges would interfere:
  "an" from "and" would split "triangle")."""
  words = [list(w[:-1]) + [w[-1] + end] for w in dict.fromkeys(words) if w]
  merges = []
  while True:
    counts: dict[tuple[str, str], int] = {}
    for w in words:
      for pair in zip(w, w[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    if not counts:
      return merges
    best = max(counts, key=lambda p: (counts[p], p))  # deterministic tie-break
    merges.append(best)
    new_words = []
    for w in words:
      out, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == best:
          out.append(w[i] + w[i + 1])
          i += 2
        else:
          out.append(w[i])
          i += 1
      new_words.append(out)
    words = new_words
