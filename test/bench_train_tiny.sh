#!/bin/sh
# bench_train_tiny.sh LOUPE MAKE_SHAPES BUILD_DIR: images per second of a short
# training run of a tiny configuration (tiny-a's, from loupe init) on 64 shape images,
# stage cls_seg (everything trains) and seg (frozen backbone: its outputs are kept, so
# epochs after the first skip it). 2 threads.
loupe=$1
shapes=$2
dir=$3/bench-train-tiny
rm -rf "$dir"
mkdir -p "$dir"
photos="test/corpus/jpeg/face_1024x768_q90_420.jpg test/golden/tiny-b/image.jpg test/corpus/png/ljt_vgl_5674_0098.png"
"$shapes" "$dir/data" 64 1 $photos || exit 1
"$loupe" init --config test/golden/tiny-a/config.json -o "$dir/init.bin" --seed 7 || exit 1
for stage in cls_seg seg; do
    start=$(date +%s.%N)
    OMP_NUM_THREADS=2 "$loupe" train --stage $stage -m "$dir/init.bin" --train "$dir/data" -o "$dir/$stage.bin" \
        --epochs 3 --batch 8 --accum 1 -q || exit 1
    end=$(date +%s.%N)
    awk -v s="$start" -v e="$end" -v st=$stage 'BEGIN { printf "tiny %s: 3 epochs of 64 images in %.1f s = %.1f images/s\n", st, e - s, 192 / (e - s) }'
done
