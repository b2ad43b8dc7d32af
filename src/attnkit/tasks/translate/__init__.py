"""``attnkit translate``: train an attention translator and see where it looks.

Pieces, one per file: ``tokenize`` (text <-> tokens), ``vocab`` (words <-> ids), ``subword`` (byte-level BPE
text <-> ids), ``vocabulary`` (either kind behind one interface on token lists), ``data`` (the embedded
date task with gold alignments, the Tatoeba loader, the split), ``models`` (GRU + additive / Luong attention,
Transformer), ``train`` (loop, checkpoints, resume), ``decode`` (greedy, beam, batched beam), ``metrics`` (BLEU,
sacreBLEU 13a and chrF, exact match, alignment accuracy), ``evaluate`` (held-out scores, samples.txt, heatmaps),
``checkpoint`` (safetensors + JSON), ``errors`` (the one-line user-facing error) and ``cli``.
"""
