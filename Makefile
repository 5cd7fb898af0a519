# kdcache: every target sets up what it needs (.venv with the pinned torch, the Fashion-MNIST
# Debian package where apt is available).
PY      := .venv/bin/python
KDCACHE := .venv/bin/kdcache
STAMP   := .venv/.installed

.PHONY: setup data test test-fast demo smoke bench bench-data fashion-all cifar-all imagenet-all clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	.venv/bin/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

data:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; }

test: setup data
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup data
	$(KDCACHE) demo

smoke: setup data
	$(KDCACHE) sweep pipelines/smoke.toml

bench: setup data
	$(KDCACHE) bench

# the data path of a dataset of files: 70k generated JPEGs (written once to cache/bench-data), 0/1/2 workers
bench-data: setup data
	$(KDCACHE) bench-data

fashion-all: setup data
	$(KDCACHE) sweep pipelines/fashion-mnist.toml && $(KDCACHE) report --pipeline pipelines/fashion-mnist.toml

cifar-all: setup
	$(KDCACHE) sweep pipelines/cifar100.toml && $(KDCACHE) report --pipeline pipelines/cifar100.toml

imagenet-all: setup
	$(KDCACHE) sweep pipelines/imagenet.toml && $(KDCACHE) report --pipeline pipelines/imagenet.toml

# What the commands create; never the committed results (results/bench.parquet, results/fashion-mnist*).
clean:
	rm -rf cache runs checkpoints .pytest_cache
	rm -rf results/runs.parquet results/demo.parquet results/smoke* results/report
	test ! -d results || find results -name '*.lock' -type f -delete
