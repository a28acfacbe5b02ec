"""What scoring multiple choice from the loss pass saves (issue 22, item 2), in tokens.

An MMLU-style test record ("B. ..." as the response) is scored twice in a cell: its held-out
loss, and its accuracy from the log-likelihood of each option after the prompt. Before, the
accuracy took a second forward pass over every prompt; now the loss pass's logits at the
option's position give the same numbers (``loss_pass_probes``). This counts, for a test file,
the tokens of the loss pass and of the second pass that is no longer run, with the same
tokenizer, template and length cap as a quality cell. Tokens are exact; seconds scale with them.

    PYTHONPATH=src python benchmarks/quality/eval_cost.py runs/quality-data/medical/domain_test.jsonl
"""

from __future__ import annotations

import argparse
import json

from ntkselect.data.records import load_records, tokenize_records
from ntkselect.evaluation.metrics import _context_ids, is_mc_record, loss_pass_probes, mc_items
from ntkselect.model.loading import load_tokenizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("test", help="the domain's test records (JSONL)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--template", default="plain")
    ap.add_argument("--max-length", type=int, default=512, help="the cell's eval_max_length")
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.model)
    recs = load_records(args.test)
    examples, _ = tokenize_records(recs, tok, args.max_length, args.template)
    loss_tokens = sum(len(e.input_ids) for e in examples)
    mc = [i for i, r in enumerate(recs) if is_mc_record(r)]
    items = mc_items([recs[i] for i in mc])
    probes = loss_pass_probes(tok, items, [examples[i] for i in mc], args.template, args.max_length)
    second = sum(len(_context_ids(tok, it.prompt, args.template)) for it in items)  # one pass per prompt (single-token options)
    left = sum(len(_context_ids(tok, it.prompt, args.template)) for k, it in enumerate(items) if k not in probes)
    before, after = loss_tokens + second, loss_tokens + left
    print(f"{len(recs)} test records, {len(items)} with options, {len(probes)} scored from the loss pass")
    print(f"evaluation tokens per fine-tuned model: before {before:,} (loss pass {loss_tokens:,} + option pass {second:,}), ", end="")
    print(f"after {after:,}: {before / after:.2f}x fewer")
    print(json.dumps({"records": len(recs), "mc": len(items), "from_loss_pass": len(probes), "before": before, "after": after}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
