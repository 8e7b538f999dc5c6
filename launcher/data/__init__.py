"""Data: tokenizers, preprocessing into mmap indexed datasets, GPT and fine-tuning datasets.

    tokenizer.py      gpt2bpe / jiebabpe byte-level BPE: train, save, load, transformers export
    jieba_split.py    jiebabpe's word splitting (jieba on Chinese runs only)
    sources.py        input files -> documents, read through `datasets`
    pipeline.py       documents -> PREFIX.bin/.idx on a worker pool (what launcher/preprocess.py runs)
    indexed.py        the MMIDIDX .bin/.idx format: atomic writer, validating mmap reader
    gpt_dataset.py    pretraining samples: packing, split, shuffle, blend
    index_cache.py    build-once .npy caches for the sample index
    sft.py            fine-tuning examples with a target-only loss mask
    stdlib_corpus.py  the embedded default corpus (the interpreter's standard library)
"""
