#!/bin/sh
# test_train.sh LOUPE MAKE_SHAPES BUILD_DIR: a short real training run.
# A labelled set of photo crops with coloured shapes pasted in (test/make_shapes.c), a
# tiny Loupe initialised from scratch (loupe init, tiny-a's config), then loupe train
# --stage cls_seg. Asserted: the training loss falls (mean of the last epoch's steps
# below LOSS_RATIO of the first epoch's), and on a held-out set loupe eval improves by
# margins a broken gradient would miss (AUC and pixel IoU). Also: --resume continues a
# run bit for bit (two epochs in one run = one epoch, then --resume for the second),
# and bad datasets or options stop before any compute with one message and no output.
# Prints "N passed, M failed". $RUN prefixes every run.
loupe=$1
shapes=$2
dir=$3/train-test
passed=0
failed=0
rm -rf "$dir"
mkdir -p "$dir"

check() { # check DESCRIPTION COMMAND...
    what=$1; shift
    if "$@"; then passed=$((passed + 1)); echo "ok   $what"; else failed=$((failed + 1)); echo "FAIL $what"; fi
}
value() { awk -v k="$1" '$1 == k { print $2 }' "$2"; }
# at_least A B M: A >= B + M (floats; nan fails)
at_least() { awk -v a="$1" -v b="$2" -v m="$3" 'BEGIN { exit !(a == a + 0 && b == b + 0 && a >= b + m) }'; }

photos="test/corpus/jpeg/face_1024x768_q90_420.jpg test/golden/tiny-b/image.jpg test/corpus/png/ljt_vgl_5674_0098.png"
$RUN "$shapes" "$dir/train" 48 1 $photos || exit 1
$RUN "$shapes" "$dir/valid" 24 2 $photos || exit 1
$RUN "$loupe" init --config test/golden/tiny-a/config.json -o "$dir/init.bin" --seed 7 || exit 1

$RUN "$loupe" eval -m "$dir/init.bin" -q "$dir/valid" > "$dir/before.txt" || exit 1
$RUN "$loupe" train --stage cls_seg -m "$dir/init.bin" --train "$dir/train" --valid "$dir/valid" -o "$dir/out.bin" \
    --epochs 6 --batch 4 --accum 1 --lr 1e-3 --backbone-lr 1e-3 --seed 3 2> "$dir/train.log"
status=$?
check "loupe train exits 0" test "$status" -eq 0
check "the best and the last model and the state are written" test -f "$dir/out.bin" -a -f "$dir/out.last.bin" -a -f "$dir/out.state"
$RUN "$loupe" eval -m "$dir/out.bin" -q "$dir/valid" > "$dir/after.txt" || exit 1
sed 's/^/  before: /' "$dir/before.txt" | grep -E 'auc|iou|f1'
sed 's/^/  after:  /' "$dir/after.txt" | grep -E 'auc|iou|f1'
# the loss of each step: "step N/T epoch E/T loss X ..."
first=$(awk '$1 == "step" && $3 == "epoch" && $4 ~ /^1\// { s += $6; n++ } END { if (n) print s / n }' "$dir/train.log")
last=$(awk '$1 == "step" && $3 == "epoch" { split($4, e, "/"); if (e[1] == e[2]) { s += $6; n++ } } END { if (n) print s / n }' "$dir/train.log")
echo "  mean step loss: first epoch $first, last epoch $last"
check "the training loss falls below 0.6 of the first epoch's" awk -v a="$last" -v b="$first" 'BEGIN { exit !(a == a + 0 && a < 0.6 * b) }'
check "held-out AUC rises by 0.15 and reaches 0.85" sh -c "awk -v a=$(value auc "$dir/after.txt") -v b=$(value auc "$dir/before.txt") 'BEGIN { exit !(a >= b + 0.15 && a >= 0.85) }'"
check "held-out pixel IoU rises by 0.1" at_least "$(value iou "$dir/after.txt")" "$(value iou "$dir/before.txt")" 0.1

# --resume: one run of 2 epochs = 1 epoch, then --resume to 2 epochs, bit for bit
$RUN "$loupe" train --stage seg -m "$dir/init.bin" --train "$dir/train" -o "$dir/full.bin" --epochs 2 --batch 4 --accum 2 -q
$RUN "$loupe" train --stage seg -m "$dir/init.bin" --train "$dir/train" -o "$dir/half.bin" --epochs 2 --batch 4 --accum 2 -q --max-steps 3
$RUN "$loupe" train --stage seg -m "$dir/init.bin" --train "$dir/train" -o "$dir/half.bin" --epochs 2 --batch 4 --accum 2 -q --resume
check "--resume mid-epoch continues bit for bit" cmp -s "$dir/full.last.bin" "$dir/half.last.bin"
check "a stopped and resumed run's state equals an uninterrupted one's" cmp -s "$dir/full.state" "$dir/half.state"

# The classifier loss's class weights are the config's (loupe.cls_forge_weight and
# patch_forge_weight, recorded in the weight file by loupe init): on authentic images only
# (4 images listed without masks) each Poly-1 term is (1 - alpha) x a focal part + a part
# without alpha, so the first step's loss is linear in each alpha, and moves with it.
ls "$dir/train/images" | head -n 4 | sed "s|^|images/|" > "$dir/train/real4.txt"
alpha_loss() { # alpha_loss CLS PATCH: the loss of the first step with these weights
    sed -e "s/\"cls_forge_weight\": 0.2,/\"cls_forge_weight\": $1,/" \
        -e "s/\"patch_forge_weight\": 0.85,/\"patch_forge_weight\": $2,/" test/golden/tiny-a/config.json > "$dir/alpha.json"
    $RUN "$loupe" init --config "$dir/alpha.json" -o "$dir/alpha.bin" --seed 7 2> "$dir/alpha-init.err" || return 1
    $RUN "$loupe" train --stage cls -m "$dir/alpha.bin" --train "$dir/train/real4.txt" -o "$dir/alpha-out.bin" \
        --batch 4 --accum 1 --max-steps 1 --seed 3 2>&1 | awk '$1 == "step" && $2 ~ /^1\// { print $6 }'
}
c2=$(alpha_loss 0.2 0.85); c5=$(alpha_loss 0.5 0.85); c8=$(alpha_loss 0.8 0.85)
p5=$(alpha_loss 0.2 0.5); p1=$(alpha_loss 0.2 0.15)
echo "  first-step loss on authentic images: cls_forge_weight 0.2 / 0.5 / 0.8: $c2 $c5 $c8; patch_forge_weight 0.85 / 0.5 / 0.15: $c2 $p5 $p1"
# the printed loss has 5 decimals: three readings differ from the exact line by at most 2e-5
linear() { awk -v a="$1" -v b="$2" -v c="$3" 'BEGIN { d = (b - a) - (c - b); exit !(a == a + 0 && b == b + 0 && c == c + 0 && b - a > 1e-3 && d < 3e-5 && d > -3e-5) }'; }
check "cls_forge_weight from the config: the first-step loss is linear in it and falls as it rises" linear "$c8" "$c5" "$c2"
check "patch_forge_weight from the config: the first-step loss is linear in it and falls as it rises" linear "$c2" "$p5" "$p1"
sed 's/"cls_forge_weight": 0.2,/"cls_forge_weight": 1.5,/' test/golden/tiny-a/config.json > "$dir/alpha.json"
rm -f "$dir/alpha-bad.bin"
$RUN "$loupe" init --config "$dir/alpha.json" -o "$dir/alpha-bad.bin" --seed 7 2> "$dir/bad.err"
status=$?
check "loupe init: a class weight outside 0..1 is refused (one message naming it, no output)" \
    sh -c "test $status -ne 0 && grep -q cls_forge_weight '$dir/bad.err' && test ! -e '$dir/alpha-bad.bin' && test \$(wc -l < '$dir/bad.err') -eq 1"

# bad inputs: one message naming the problem, non-zero exit, no output
mkdir -p "$dir/bad/images" "$dir/bad/masks"
cp "$dir/train/images/001.png" "$dir/bad/images/a.png"
head -c 100 "$dir/train/masks/001.png" > "$dir/bad/masks/a.png"
$RUN "$loupe" train --stage seg -m "$dir/init.bin" --train "$dir/bad" -o "$dir/bad.bin" 2> "$dir/bad.err"
status=$?
check "a damaged mask stops training before any compute (exit 1, names the file, no output)" \
    sh -c "test $status -eq 1 && grep -q 'masks/a.png' '$dir/bad.err' && test ! -e '$dir/bad.bin' && test \$(wc -l < '$dir/bad.err') -eq 1"
$RUN "$loupe" train --stage nope -m "$dir/init.bin" --train "$dir/train" -o "$dir/bad.bin" 2> "$dir/bad.err"
status=$?
check "an unknown stage is a usage error (exit 2, one line)" sh -c "test $status -eq 2 && test \$(wc -l < '$dir/bad.err') -eq 1"
$RUN "$loupe" train --stage seg -m "$dir/missing.bin" --train "$dir/train" -o "$dir/bad.bin" 2> "$dir/bad.err"
status=$?
check "a missing model stops training (exit 1, names it, no output)" \
    sh -c "test $status -eq 1 && grep -q 'missing.bin' '$dir/bad.err' && test ! -e '$dir/bad.bin'"
$RUN "$loupe" train -h > "$dir/help.txt"
check "loupe train -h documents every option" sh -c "grep -q -- '--backbone-lr' '$dir/help.txt' && grep -q -- '--resume' '$dir/help.txt'"
echo "test_train: $passed passed, $failed failed"
test "$failed" -eq 0
