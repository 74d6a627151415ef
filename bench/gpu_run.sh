#!/usr/bin/env bash
# One GPU session (device machine: torch + triton + transformers + peft present, no bitsandbytes or
# serving packages): install the carried wheels (.whl/), then run the named steps; results go to $OUT.
# Usage there: bash bench/gpu_run.sh STEP [STEP ...]
#   decodeab   bench/nf4_matmul.py --decode-ab (the NF4 kernel's gather vs permute decode, 8B shapes), ~3 min
#   micro      bench/nf4_matmul.py and bench/paged_attention.py (kernel speed and correctness)
#   sumab      bench/nf4_matmul.py --sum-ab: split-K partial sums by a second launch vs in the kernel (8B shapes)
#   early      bench/nf4_early_launch.py: the NF4 kernel launched early (PDL) vs after the previous kernel (8B shapes)
#   ktimes     bench/nf4_kernel_times.py: an NF4 call's kernel, split-K sum tail and launch gap against dense (8B), ~2 min
#   fold       the folded-prefill GPU test, then bench/step_host.py --shape 8b --fold-ab: prefill and mixed steps with
#              adapters, their deltas folded into the NF4 prefill matmuls (kernels/lora_fold.py) vs expanded, ~4 min;
#              foldab: the benchmark only (no default model needed: it may run before the gguf chunks are in)
#   opsab      bench/step_host.py --ops-ab: the adapter cases again with TritonAdapterOps knobs changed (OPS_AB, default
#              "--ops-ab presum=False --ops-ab num_splits=1 --ops-ab expand_grid_divisor=2 --ops-ab expand_grid_divisor=4":
#              the split-K sums in the expand instead of a reduce launch, no split, the expand's tile axis halved and
#              quartered), each variant's GPU time and kernel diff against the default, ~5 min
#   grid       bench/nf4_matmul.py --grid "8b o_proj" --rows 48 64: a grid of tilings beyond the calibration's, ~40 s
#   test       the CUDA-only tests (fast path vs eager reference; LIMIT_TEST: seconds before they are stopped), ~6 min
#              on a fresh H100 (10 tests, 2026-12-07: the calibration compiles its candidates on 16 threads)
#   check      the fused layer kernels' start-up self-check on this GPU
#   pack8b | pack1b   bench/pack_speed.py (issue #20: the hot-load's pack by threads, foreach, memcpy floor), ~1 min
#   kernels    bench/lora_kernels.py (ARGS_KERNELS)    kernelsab: the same before and after a patch (AB_PATCH)
#   accept     issue #19's acceptance steps: test, trace8b (ARGS_TRACE, default "--rates inf,4,8"), serve8b (ARGS8B,
#              default "--cases base,distinct,hotload,merged --skip-peft"), ~20 min: as BG_STEPS=accept after the three
#              gguf calls (`... gguf; BG_STEPS=accept bash bench/gpu_run.sh background; WAIT=500 bash bench/gpu_run.sh wait`)
#   serve1b    bench/serve_gpu.py --shapes 1b      serve8b: the same for 8b (ARGS, ARGS1B, ARGS8B: extra flags;
#              LIMIT: seconds before it is stopped, its JSON kept as far as it got)
#   trace1b | trace8b   bench/serve_trace.py --shapes 1b / 8b (ARGS_TRACE: extra flags, e.g. "--rates inf,4": a comma list)
#   scale8b | scale1b   bench/adapter_scale.py --gpu --shape 8b / 1b (issue #20: fp32 upload MB/s, hot-load and
#              --adapter-source first token, the trace over 1,000 adapters / 64; ARGS_SCALE: extra flags, e.g.
#              --skip-trace): $OUT/adapter_scale_gpu.json (1b: adapter_scale_gpu_1b.json) + its server log, and
#              py-spy's samples of the server during the uploads and each trace ($OUT/py_spy_scale/, summed).
#              8b needs ~32 GB of disk under /tmp/serve_gpu/8b (checkpoint + 1,069 adapter folders), ~5 min
#   trim8b     remove the 8B shape's adapter folders, keep its checkpoint; clean8b: remove it all
#   host1b | host8b   bench/step_host.py (host vs GPU time of eager steps, cProfile; ARGS_HOST: extra flags)
#   profile1b | profile8b   bench/profile_step.py (kernels by GPU time per case; ARGS_PROFILE: extra flags)
#   background  run BG_STEPS (default "serve8b serve1b") detached (setsid) into /tmp/out, so that one run
#              can outlast a command. It runs from its own copy of this tree (/tmp/bgtree): every call copies the
#              working tree again, and a run reading this tree died importing loraplex while a `wait` call re-copied
#              it (a `test` step, 2026-12-07 19:07). Carry the gguf chunks first: a serve8b started before the three
#              gguf chunk calls died importing serve_gpu_models (2026-12-07). Two GPU steps at once (a `test` beside
#              a background serve8b) spoil both's numbers
#   wait       until the background run ends or WAIT seconds (default 540) passed: progress, then copy. The machine
#              goes back after idle_release_s without a call (30 s on 2026-12-07 21:35, the background run with it):
#              chain the `wait` calls with no pause between them (`... background; WAIT=500 bash bench/gpu_run.sh wait`
#              in the call that starts it)
#   gguf       append the carried chunks .gguf_part/* to /tmp/model.gguf (the default model's 98 MB do not
#              fit one 64 MiB carry: cut it here into part-00 (the first 29,000,000 bytes, small enough to go
#              beside .whl's 32 MB and the tree's 5 MB), part-01 and part-02.last (halves of the rest), and carry
#              one chunk per command: [".whl", ".gguf_part/part-00"], then [".gguf_part/part-01"], then
#              [".gguf_part/part-02.last"]; .whl fits beside a chunk once bitsandbytes' wheel keeps only its
#              cpu/cuda130/cuda132 libraries: 43 -> 7 MB, see ../shared/NOTES.md)
#   trainspeed1b   bench/train_speed.py --shapes 1b (all methods + the fast-vs-unfused loss check), ~5 min
#   trainspeed8b   the same on 8b for lora,qlora (the summary's ratios); trainspeed8b_more: gralora,flexora.
#              They add to one $OUT/train_speed.json (ARGS_SPEED: extra flags); needs the bitsandbytes wheel
#   quality    bench/train_quality.py (the comparisons of issue #21, 3 seeds; ARGS_QUALITY: extra flags); run it
#              as BG_STEPS=quality (background + wait): started again, it keeps the runs /tmp/out holds, and on a
#              fresh machine those of bench/results/train_quality.json (commit a partial one between sessions)
#   engine | quality16 | quality64   the older engine and training benchmarks
set -uo pipefail
export PYTHONUNBUFFERED=1 LORAPLEX_CACHE=/tmp/lpcache LORAPLEX_GGUF=${LORAPLEX_GGUF:-/tmp/model.gguf}
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/.pth PATH=/tmp/site/bin:$PATH
if [ ! -d .pth/loraplex ]; then  # the package layout of pyproject.toml, as links (no pip install needed)
  mkdir -p .pth/loraplex && touch .pth/loraplex/__init__.py
  for pair in runtime:runtime kernels:kernels trainer:trainer protos:protos client:runtime/client; do
    ln -sfn "$PWD/${pair#*:}" ".pth/loraplex/${pair%%:*}"
  done
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case "$step" in
    decodeab)  # the NF4 kernel's two decodes (table gather, register permutes) on the 8B shapes, beside dense bf16
      python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_fastpath.py -k permute 2>&1 | tail -3  # (and the scaled decode)
      python3 bench/nf4_matmul.py --decode-ab --rows ${ROWS_AB:-1 2 16 32 48 64 96 128} --out "$OUT/nf4_decode_ab.json" 2>&1 \
        | grep -v "it/s" | tail -60 ;;
    sumab)  # split-K sums by a second launch vs in the kernel, the 8B layer's four matmuls beside dense bf16
      python3 bench/nf4_matmul.py --sum-ab --rows ${ROWS_SUM:-16 48 64} --out "$OUT/nf4_sum_ab.json" 2>&1 \
        | tail -60 ;;
    early)  # the NF4 kernel launched early (programmatic dependent launch) vs late, beside dense bf16
      python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_fastpath.py -k early_launched 2>&1 | tail -3
      python3 bench/nf4_early_launch.py --rows ${ROWS_EARLY:-1 16 32 48 64} --out "$OUT/nf4_early_launch.json" 2>&1 \
        | grep -v "it/s" | tail -30 ;;
    ktimes)  # where an NF4 call's time goes, by kernel (profiler records), beside dense bf16
      python3 bench/nf4_kernel_times.py --rows ${ROWS_KTIMES:-16 48 64} --out "$OUT/nf4_kernel_times.json" 2>&1 \
        | grep -v "it/s" | tail -20 ;;
    fold|foldab)  # adapter deltas folded into the prefill matmuls vs the expand kernels: equal logits, GPU time per step
      [ "$step" = fold ] && python3 -m pytest -q -x -s -p no:cacheprovider tests/test_gpu_fastpath.py -k folded_prefill \
        2>&1 | tail -4
      python3 bench/step_host.py --shape ${FOLD_SHAPE:-8b} --fold-ab --repeats 5 --out "$OUT/step_host_fold_${FOLD_SHAPE:-8b}.json" \
        ${ARGS_FOLD:-} > "$OUT/step_host_fold.log" 2>&1
      grep -E "^(-- |warm-up|case |prefill_|four_|mixed_|Traceback|[A-Za-z]*Error)|^ +[+-][0-9]" "$OUT/step_host_fold.log" | tail -150 ;;
    opsab)  # the adapter ops' knobs against their defaults on the prefill and mixed steps (OPS_AB: --ops-ab flags)
      python3 bench/step_host.py --shape ${OPS_SHAPE:-8b} --repeats 5 --out "$OUT/step_host_ops_ab_${OPS_SHAPE:-8b}.json" \
        ${OPS_AB:---ops-ab presum=False --ops-ab num_splits=1 --ops-ab expand_grid_divisor=2 --ops-ab expand_grid_divisor=4} > "$OUT/step_host_ops_ab.log" 2>&1
      grep -E "^(-- |warm-up|case |prefill_|four_|mixed_|Traceback|[A-Za-z]*Error)|^ +[+-][0-9]" "$OUT/step_host_ops_ab.log" \
        | tail -150 ;;
    grid)
      python3 bench/nf4_matmul.py --grid "${GRID_WEIGHT:-8b o_proj}" --rows ${ROWS_GRID:-48 64} --out "$OUT/nf4_tile_grid.json" ${ARGS_GRID:-} \
        2>&1 | grep -v "it/s" | tail -20 ;;
    micro)
      python3 bench/nf4_matmul.py --out "$OUT/nf4_matmul.json" 2>&1 | tail -40
      python3 bench/paged_attention.py --out "$OUT/paged_attention.json" 2>&1 | tail -30 ;;
    test)
      timeout -k 10 ${LIMIT_TEST:-36000} python3 -m pytest -q -x -s -p no:cacheprovider tests/test_gpu_fastpath.py \
        > "$OUT/test_gpu_fastpath.log" 2>&1
      tr '\r' '\n' < "$OUT/test_gpu_fastpath.log" | grep -vE "it/s|s/it|step/s|layer/s|tensor/s" | tail -40 ;;
    accept)  # issue #19's acceptance steps in one go, in the order of the last runs: the GPU tests, the 8B trace, serve_gpu 8B
      OUT="$OUT" bash bench/gpu_run.sh test
      OUT="$OUT" ARGS_TRACE="${ARGS_TRACE:---rates inf,4,8}" bash bench/gpu_run.sh trace8b
      OUT="$OUT" ARGS8B="${ARGS8B:---cases base,distinct,hotload,merged --skip-peft}" bash bench/gpu_run.sh serve8b ;;
    serve1b)
      timeout -k 10 ${LIMIT:-36000} python3 bench/serve_gpu.py --shapes 1b --out "$OUT/serve_gpu.json" ${ARGS1B:-${ARGS:-}} 2>&1 | tail -60 ;;
    serve8b)
      timeout -k 10 ${LIMIT:-36000} python3 bench/serve_gpu.py --shapes 8b --out "$OUT/serve_gpu.json" ${ARGS8B:-${ARGS:-}} 2>&1 | tail -60 ;;
    trace1b|trace8b)  # bench/serve_trace.py on one shape (ARGS_TRACE: extra flags); server logs kept
      (cd bench && timeout -k 10 ${LIMIT:-36000} python3 serve_trace.py --shapes ${step#trace} \
        --out "$OUT/serve_trace_${step#trace}.json" ${ARGS_TRACE:-} 2>&1 | grep -vE "it/s|tensor/s|layer/s" | tail -40)
      cp /tmp/serve_gpu/${step#trace}/server-*.log "$OUT/" 2>/dev/null ;;
    scale8b|scale1b)  # bench/adapter_scale.py --gpu on one shape (ARGS_SCALE: extra flags); its server log kept
      shape=${step#scale}; name=adapter_scale_gpu$([ "$shape" = 8b ] || echo "_$shape")
      timeout -k 10 ${LIMIT:-36000} python3 bench/adapter_scale.py --gpu --shape $shape --out "$OUT/$name.json" \
        --py-spy "$OUT/py_spy_scale" ${ARGS_SCALE:-} 2>&1 | grep -vE "it/s|tensor/s|layer/s" | tail -40
      ls "$OUT"/py_spy_scale/*.txt >/dev/null 2>&1 && python3 bench/py_spy.py "$OUT"/py_spy_scale/*.txt --top 25 \
        > "$OUT/py_spy_scale/top.txt" 2>&1
      log=$(ls -t /tmp/serve_gpu/$shape/server-*.log 2>/dev/null | head -1)
      [ -n "$log" ] && cp "$log" "$OUT/${name}_server.log"
      df -h /tmp | tail -1 ;;
    trim8b)  # everything of the 8B shape but its checkpoint (the adapters of earlier steps): room for scale8b's
      find /tmp/serve_gpu/8b -mindepth 1 -maxdepth 1 ! -name model -exec rm -rf {} + 2>/dev/null; df -h /tmp | tail -1 ;;
    clean8b)  # the 8B checkpoint and adapters (tens of GB): room on the disk for the next shape
      rm -rf /tmp/serve_gpu/8b; df -h /tmp | tail -1 ;;
    pack8b|pack1b)  # bench/pack_speed.py: where a hot-load's pack goes (threads, one foreach call, the memcpy floor)
      (cd bench && python3 pack_speed.py --shape ${step#pack} --out "$OUT/pack_speed_${step#pack}.json" 2>&1 | tail -12) ;;
    kernels)  # bench/lora_kernels.py (ARGS_KERNELS: its flags, default --no-grid --skip-check: summary, groups, extras)
      python3 bench/lora_kernels.py ${ARGS_KERNELS:---no-grid --skip-check} --out "$OUT/kernels.json" 2>&1 | tail -40 ;;
    kernelsab)  # A/B on one GPU: `kernels` on a copy of this tree with the patch AB_PATCH reversed ($OUT/before),
      # then here ($OUT/after); make the patch with `git diff OLD NEW -- kernels runtime > ab.patch`, left untracked
      rm -rf /tmp/ab && mkdir /tmp/ab && cp -r $(ls -A | grep -vxE '\.pth|\.git') /tmp/ab/
      (cd /tmp/ab && patch -s -R -p1 < "$AB_PATCH" && OUT="$OUT/before" bash bench/gpu_run.sh kernels)
      OUT="$OUT/after" bash bench/gpu_run.sh kernels ;;
    check)
      python3 -c "import torch; from loraplex.kernels.layer_ops import self_check as c
print('layer_ops self-check bf16:', c(torch.device('cuda'), torch.bfloat16) or 'ok', '| fp32:', c(torch.device('cuda'), torch.float32) or 'ok')" ;;
    host1b|host8b)  # bench/step_host.py: host vs GPU time of eager steps (ARGS_HOST: extra flags)
      python3 bench/step_host.py --shape ${step#host} --out "$OUT/step_host_${step#host}.json" ${ARGS_HOST:-} 2>&1 | tail -${TAIL:-300} ;;
    profile1b)
      python3 bench/profile_step.py --shape 1b --out "$OUT/profile_step_1b.json" ${ARGS_PROFILE:-} 2>&1 | tail -400 ;;
    profile8b)
      python3 bench/profile_step.py --shape 8b --out "$OUT/profile_step_8b.json" ${ARGS_PROFILE:-} 2>&1 | tail -400 ;;
    background)
      rm -f /tmp/out/background.done
      rm -rf /tmp/bgtree && mkdir /tmp/bgtree && cp -r $(ls -A | grep -vxE '\.pth|\.git|\.gguf_part') /tmp/bgtree/
      (cd /tmp/bgtree && OUT=/tmp/out setsid nohup bash -c \
        "bash bench/gpu_run.sh ${BG_STEPS:-serve8b serve1b}; touch /tmp/out/background.done" \
        > /tmp/out/background.log 2>&1 < /dev/null &)
      echo "background run started from /tmp/bgtree: ${BG_STEPS:-serve8b serve1b}" ;;
    wait)
      end=$((SECONDS + ${WAIT:-540}))
      while [ ! -e /tmp/out/background.done ] && [ $SECONDS -lt $end ]; do  # copies as it goes: a call cut
        sleep 10; [ "$OUT" != /tmp/out ] && cp -r /tmp/out/. "$OUT"/ 2>/dev/null  # short still returns results
      done
      [ -e /tmp/out/background.done ] && echo "background run finished" || echo "background run still going"
      tail -40 /tmp/out/background.log
      [ "$OUT" != /tmp/out ] && cp -r /tmp/out/. "$OUT"/ ;;
    gguf)  # chunks are named in order; the last one ends in .last; each is removed once appended (a chunk of an
      # earlier call stays in the tree there, and must not be appended twice)
      last=$(ls .gguf_part/*.last 2>/dev/null)
      for chunk in .gguf_part/*; do cat "$chunk" >> /tmp/model.gguf.part && rm -f "$chunk"; done
      ls -l /tmp/model.gguf.part
      if [ -n "$last" ]; then mv /tmp/model.gguf.part /tmp/model.gguf && echo "default model assembled"; fi ;;
    engine)
      python3 bench/engine_cpu.py --device cuda --quantization nf4 --adapter-ops triton --batch 32 --new-tokens 64 \
        --out "$OUT/engine_gpu_nf4_triton.json" 2>&1 | grep -v "it/s\]" ;;
    trainspeed1b)
      timeout -k 10 ${LIMIT:-36000} python3 bench/train_speed.py --shapes 1b --out "$OUT/train_speed.json" ${ARGS_SPEED:-} 2>&1 \
        | tr '\r' '\n' | grep -vE "it/s|s/it|step/s|Loading weights" | tail -60 ;;
    trainspeed8b|trainspeed8b_more)
      methods=lora,qlora; [ "$step" = trainspeed8b_more ] && methods=gralora,flexora
      timeout -k 10 ${LIMIT:-36000} python3 bench/train_speed.py --shapes 8b --methods $methods --out "$OUT/train_speed.json" \
        ${ARGS_SPEED:-} 2>&1 | tr '\r' '\n' | grep -vE "it/s|s/it|step/s|Loading weights" | tail -60 ;;
    quality)  # a fresh machine resumes from the committed JSON (the script keeps its runs when the settings match)
      for _ in $(seq 60); do [ -e "$LORAPLEX_GGUF" ] && break; sleep 10; done  # the gguf chunks may still be coming
      [ -e "$OUT/train_quality.json" ] || cp bench/results/train_quality.json "$OUT/" 2>/dev/null
      timeout -k 10 ${LIMIT_QUALITY:-${LIMIT:-36000}} python3 bench/train_quality.py --out "$OUT/train_quality.json" ${ARGS_QUALITY:-} 2>&1 \
        | tr '\r' '\n' | grep -vE "it/s|s/it|step/s|Loading weights" | tail -80 ;;
    quality16)
      python3 bench/train_quality.py --rank 16 --steps 150 --batch-size 16 --out "$OUT/train_quality_gpu_r16.json" 2>&1 \
        | grep -vE "step/s|it/s" ;;
    quality64)
      python3 bench/train_quality.py --rank 64 --steps 150 --batch-size 16 --out "$OUT/train_quality_gpu_r64.json" 2>&1 \
        | grep -vE "step/s|it/s" ;;
  esac
done
