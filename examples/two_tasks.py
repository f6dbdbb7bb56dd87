"""Two permuted-digits tasks, trained one after the other, with and without MAS.

Run: python examples/two_tasks.py   (needs scikit-learn for the bundled digits data)
"""

from __future__ import annotations

import copy

import torch
from sklearn.datasets import load_digits
from torch import nn

import mas_local as ml


def make_tasks(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    train, test = order[:1400], order[1400:]
    tasks = []
    for t in range(2):
        perm = torch.arange(64) if t == 0 else torch.randperm(64, generator=g)
        tasks.append(((x[train][:, perm], y[train]), (x[test][:, perm], y[test])))
    return tasks


def train(model, data, mas=None, epochs=5):
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(x), 32):
            loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            if mas is not None:
                loss = loss + mas.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy(model, data):
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main():
    torch.manual_seed(0)
    tasks = make_tasks()
    base = ml.convert(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
    train(base, tasks[0][0])
    print(f"after task 1: task-1 accuracy {accuracy(base, tasks[0][1]):.3f}")
    for name, mode in (("fine-tune", None), ("global MAS", "global"), ("local MAS", "local")):
        model = copy.deepcopy(base)
        mas = None
        if mode is not None:
            mas = ml.MAS(model, lam=1.0 if mode == "global" else 0.3, mode=mode, progress=False)
            mas.consolidate([x for x, _ in zip(tasks[0][0][0].split(64), range(10))])
        train(model, tasks[1][0], mas)
        print(f"{name:>10}: task-1 {accuracy(model, tasks[0][1]):.4f}  task-2 {accuracy(model, tasks[1][1]):.4f}")


if __name__ == "__main__":
    main()
