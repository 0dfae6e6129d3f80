#!/usr/bin/python3
"""Learning curve of a `loupe train` log as a PNG (and a Markdown table of the epochs).

    tools/plot_train_log.py TRAIN.log OUT.png [TABLE.md]

Build-time tool (Debian's python3-pil). Reads the step lines ("step N/T epoch E/T loss X
(cls C seg S) grad-norm G lr L ...") and the validation lines ("epoch E valid: auc A f1 F
iou I overall O accuracy C"), draws the training loss (mean of every 25 steps) and the
learning rate against the step, and the validation metrics at each epoch's last step; the
table lists per epoch the mean training loss, the last learning rate and the metrics.
"""
import re
import sys

from PIL import Image, ImageDraw

STEP = re.compile(r"^step (\d+)/(\d+) epoch (\d+)/\d+ loss ([-\d.eE+naif]+) \(cls ([-\d.eE+naif]+) seg ([-\d.eE+naif]+)\)"
                  r" grad-norm \S+ lr (\S+)")
VALID = re.compile(r"^epoch (\d+) valid: auc (\S+) f1 (\S+) iou (\S+) overall (\S+) accuracy (\S+)")


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    steps, valid = [], []
    for line in open(sys.argv[1]):
        m = STEP.match(line)
        if m:
            steps.append((int(m.group(1)), int(m.group(3)), float(m.group(4)), float(m.group(5)), float(m.group(6)),
                          float(m.group(7))))
        m = VALID.match(line)
        if m:
            last = steps[-1][0] if steps else 0
            valid.append((int(m.group(1)), last) + tuple(float(m.group(k)) for k in range(2, 7)))
    if not steps:
        sys.exit("no step lines in " + sys.argv[1])
    W, H, L, R, T, B = 900, 520, 70, 70, 30, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    total = max(s[0] for s in steps)
    x = lambda s: L + (W - L - R) * s / total
    # training loss, smoothed over 25 steps
    k = 25
    smooth = [(steps[i][0], sum(s[2] for s in steps[max(0, i - k + 1):i + 1]) / len(steps[max(0, i - k + 1):i + 1]))
              for i in range(len(steps))]
    lo, hi = 0.0, max(v for _, v in smooth) * 1.05
    y = lambda v: T + (H - T - B) * (1 - (v - lo) / (hi - lo))
    d.rectangle([L, T, W - R, H - B], outline="black")
    d.line([(x(s), y(v)) for s, v in smooth], fill=(40, 90, 200), width=2)
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        v = lo + f * (hi - lo)
        d.text((5, y(v) - 6), "%.1f" % v, fill=(40, 90, 200))
    # learning rate (right axis, 0..max)
    lrmax = max(s[5] for s in steps) or 1.0
    ylr = lambda v: T + (H - T - B) * (1 - v / lrmax)
    d.line([(x(s[0]), ylr(s[5])) for s in steps], fill=(150, 150, 150), width=1)
    d.text((W - R + 5, T - 4), "lr %.0e" % lrmax, fill=(120, 120, 120))
    # validation metrics (0..1 on the right axis)
    y01 = lambda v: T + (H - T - B) * (1 - v)
    colours = {"auc": (200, 60, 40), "f1": (40, 160, 60), "iou": (150, 60, 180), "overall": (0, 0, 0)}
    for name, idx in (("auc", 2), ("f1", 3), ("iou", 4), ("overall", 5)):
        pts = [(x(v[1]), y01(v[idx])) for v in valid if v[idx] == v[idx]]
        if len(pts) > 1:
            d.line(pts, fill=colours[name], width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colours[name])
    for f in (0.0, 0.5, 1.0):
        d.text((W - R + 5, y01(f) - 6), "%.1f" % f, fill=(0, 0, 0))
    d.text((L, H - B + 8), "optimizer step (of %d)" % total, fill="black")
    d.text((L + 5, T + 5), "training loss (blue, mean of %d steps), learning rate (gray)" % k, fill="black")
    d.text((L + 5, T + 20), "validation: auc (red), f1 (green), iou (purple), overall (black)", fill="black")
    img.save(sys.argv[2])
    if len(sys.argv) == 4:
        with open(sys.argv[3], "w") as f:
            f.write("| epoch | steps | mean loss (cls, seg) | last lr | valid auc | f1 | iou | overall | accuracy |\n")
            f.write("|---:|---:|---|---:|---:|---:|---:|---:|---:|\n")
            for e in sorted(set(s[1] for s in steps)):
                es = [s for s in steps if s[1] == e]
                v = [w for w in valid if w[0] == e]
                loss = sum(s[2] for s in es) / len(es)
                cls = sum(s[3] for s in es) / len(es)
                seg = sum(s[4] for s in es) / len(es)
                row = "| %d | %d-%d | %.3f (%.3f, %.3f) | %.2e |" % (e, es[0][0], es[-1][0], loss, cls, seg, es[-1][5])
                row += " %.4f | %.4f | %.4f | %.4f | %.4f |" % v[0][2:] if v else " | | | | |"
                f.write(row + "\n")


if __name__ == "__main__":
    main()
