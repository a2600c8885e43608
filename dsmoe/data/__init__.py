"""The data room: corpus, tokenizer, packed token shards and the math problem generator.

- corpus.py    the embedded default corpus (en, fr, es, code, math), each document labelled
- mathgen.py   seeded arithmetic and word problems with worked answers, and their verifier
- tokenizer.py byte-level BPE: training, loading (ours or a Hugging Face checkpoint's), chat
- shards.py    memory-mapped token shards, the manifest, training and validation batches
- userfiles.py a user's --data files (text, JSONL, Parquet, folders), each problem named
- holdout.py   which text of each domain is held out for validation (documents or a tail)
- prepare.py   `dsmoe prepare`: text in, tokenizer + shards + manifest out

Nothing is imported here: each module is imported where it is used.
"""
