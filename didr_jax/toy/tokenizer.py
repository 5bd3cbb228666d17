"""A small CLIP byte-level BPE tokenizer written to a local folder (nothing downloaded).

Single bytes are tokens, and each word of ``words`` becomes one token through merges, so a
closed grammar (the toy world's prompts) tokenizes one token per word while any other text
still tokenizes (byte by byte). Loadable with transformers' ``AutoTokenizer``/``CLIPTokenizer``.
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


def learn_merges(words) -> list[tuple[str, str]]:
  """Byte-pair merges learned on ``words`` (each counted once) until every word is one token.

  Applying learned merges in rank order reproduces the learning-time segmentation, so each word
  of the list tokenizes to exactly one token (hand-written per-word merges would interfere:
  "an" from "and" would split "triangle")."""
  words = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(words) if w]
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
