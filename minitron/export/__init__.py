"""Export a causal LM to a deployable ONNX folder: KV-cache graph, INT8/INT4, GGUF, validated.

`python -m minitron.export --model M --output DIR [export.int8=blockwise|dynamic|static|none]
 [export.per_channel=true] [export.int8_cpu=auto|vnni|no-vnni|arm] [export.int4=rtn|hqq|awq|gptq|awq_gptq|none]
 [export.accuracy_level=auto|0..4] [export.gguf=none|f16|q8_0|q4_k_m|q5_k_m|q6_k|all] [export.compare=true]
 [export.compressed=none|w8a8|w4a16|all] [export.bnb=true]` (`--help` lists every setting)

The folder is an ONNX Runtime GenAI model folder: `onnxruntime_genai.Model(DIR)` generates and
streams from `model.onnx` (the quantized model unless `int8=none`) with `genai_config.json` and the
tokenizer beside it; a plain `onnxruntime.InferenceSession` runs the same graph (lm-eval's
`onnxruntime` model scores tasks on it). The graph is traced from the model's transformers forward
by PyTorch's exporter (`minitron.onnx_graph`), so every family and every shape the pruner makes
serves, including hidden_size != heads x head_dim. `report.json` / `report.md` hold the
measurements, `manifest.json` the source, settings and versions.

Weight schemes (all ONNX Runtime quantizers; MatMuls with constant weights and the embedding):
- `blockwise` INT8 (default): MatMulNBits with 8-bit weights in blocks of 128 input channels (fewer
  when 128 does not divide the width: 64 for SmolLM2), one scale per block.
- `dynamic`: `quantize_dynamic`, MatMulInteger; weights per tensor (or per output channel with
  `per_channel`), activations uint8 with one scale per tensor computed at run time.
- `static`: `quantize_static` in QDQ format, activation ranges calibrated (min/max) on blocks of
  the calibration split; per tensor or per channel; attention's MatMuls of two activations stay float.
- `smoothquant`: SmoothQuant's scales folded into the weights (the LM head's input included), then
  `static` per channel with float MatMul outputs (ORT runs those MatMuls as MatMulIntegerToFloat);
  its candidates keep fewer and fewer MatMuls FP32 (SMOOTHQUANT_CANDIDATES: down_proj and lm_head,
  down_proj, the down_proj of the layers whose INT8 costs most, none) and the fastest within the
  gates is deployed.
- `int4=rtn|hqq`: MatMulNBits with 4-bit weights (and a 4-bit GatherBlockQuantized embedding).
  `awq` folds activation-aware scales in first; `gptq` (and `awq_gptq`, after AWQ's scales) writes
  GPTQ's integers (minitron.gptq) into the MatMulNBits nodes, the LM head at `int4_head_bits`.
`dynamic` and `static` take their types and weight range from the CPU they are made for
(`minitron.cpu`: reduced-range weights without VNNI, per ONNX Runtime's guidance). MatMulNBits
models run at `accuracy_level` 0 (float activations) or 4 (int8 activations per block, faster, but
onnxruntime issue #29849 reports flipped greedy tokens on outlier-heavy LLMs): `auto` measures both
and deploys the faster one that passes the gates. The measured comparison of the schemes on
SmolLM2-135M is in docs/results.md; `compare=true` puts every variant's numbers in the report.

Validation reads a bounded number of tokens at batch 1 (`max_eval_tokens`, blocks of at most 512)
whatever the model's context. It fails the export (nothing is written) when the FP32 graph's
largest logit difference from PyTorch's, relative to the largest |logit|, is over `fp32_rtol`, its
top-1 agreement is below `fp32_min_top1`, or its greedy continuation of a held-out prompt differs
by a token; or when no deployment candidate's perplexity is within `ppl_budget` (relative) of
FP32's with top-1 agreement at least `int8_min_top1` (the same gates for INT4 and GGUF); or when
ONNX Runtime GenAI, run on the finished folder, does not generate the tokens plain ONNX Runtime
generates from the deployed graph.

The modules, in the order they build on each other:
- `variants`: the quantized variants to measure and the candidates to deploy;
- `graph`: ONNX files, external data and graph rewrites;
- `quantizers`: ONNX Runtime's INT8 and INT4 quantizers on a graph;
- `validate`: measuring against PyTorch, and the gates;
- `report`: the report's rows and `report.md`;
- `stage`: `export()`, from the checks to the written folder;
- `command`: `python -m minitron.export`.
"""

from minitron.export.command import CLI_KEYS, build_parser, main
from minitron.export.graph import (DEPLOY_FILE, fold_initializer_transposes, onnx_size_mb,
                                   quantizable_graph, relevel_onnx, remove_onnx,
                                   uses_external_data)
from minitron.export.quantizers import activation_matmuls, fp32_matmuls, quantize
from minitron.export.report import REPORT_COLUMNS, render_report, table_rows
from minitron.export.stage import (FP32_FILE, MANIFEST, MANIFEST_KIND, check_model, export,
                                   load_job, measure_pytorch, resolve_fp32_layers,
                                   sensitive_down_proj)
from minitron.export.validate import check_fp32, check_quantized, load_bnb, score
from minitron.export.variants import (SMOOTHQUANT_CANDIDATES, SMOOTHQUANT_FP32, QuantVariant,
                                      deploy_candidates, eval_shape, variants_to_measure)

__all__ = ["CLI_KEYS", "DEPLOY_FILE", "FP32_FILE", "MANIFEST", "MANIFEST_KIND", "QuantVariant",
           "REPORT_COLUMNS", "SMOOTHQUANT_CANDIDATES", "SMOOTHQUANT_FP32", "activation_matmuls",
           "build_parser", "check_fp32", "check_model", "check_quantized", "deploy_candidates",
           "eval_shape", "export", "fold_initializer_transposes", "fp32_matmuls", "load_bnb",
           "load_job", "main", "measure_pytorch", "onnx_size_mb", "quantizable_graph", "quantize",
           "relevel_onnx", "remove_onnx", "render_report", "resolve_fp32_layers", "score",
           "sensitive_down_proj", "table_rows", "uses_external_data", "variants_to_measure"]
