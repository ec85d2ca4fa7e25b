import json, sys, numpy as np
sys.path.insert(0, '/work/wt-gate')
from benchmarks.suite.report import index, delta
base = json.load(open('/work/wt-gate/benchmarks/results/suite.json'))
bi = index(base)
TV = 'upstream, train+val'
table = {}
streams = None
for f in sys.argv[1:]:
    pi = index(json.load(open(f)))
    streams = list(pi)
    for s in pi:
        for v, e in pi[s].items():
            table.setdefault(v, {})[s] = delta(e, bi[s][TV])
for r in ['confidence weight p[y]', 'SAFLEX default (margin β=1.5)', 'SAFLEX margin, val both ways', 'upstream']:
    for s in streams: table.setdefault(r, {})[s] = delta(bi[s][r], bi[s][TV])
short = [s.split('/')[0][:2] + '/' + s.split('/')[1][:10] for s in streams]
print(f"{'variant':40s} {'mean':>6s} {'g2':>3s} {'g4':>3s} " + ' '.join(f"{x:>13s}" for x in short))
rows = []
for v, vals in table.items():
    if len(vals) < len(streams): continue
    m = np.mean([vals[s][0] for s in streams])
    worse = sum(vals[s][0] <= -1 and vals[s][0] <= -2 * vals[s][1] for s in streams)
    better = sum(vals[s][0] > 0 and vals[s][0] >= 2 * vals[s][1] for s in streams)
    rows.append((m, v, worse, better, vals))
for m, v, worse, better, vals in sorted(rows, reverse=True):
    print(f"{v[:40]:40s} {m:6.2f} {worse:3d} {better:3d} " + ' '.join(f"{vals[s][0]:6.2f}±{vals[s][1]:4.2f}" for s in streams))
