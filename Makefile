# labengine lab: everyday commands. `make help` lists them.
# No need to activate anything. The python is, as in tools/_env.sh: an active virtual
# environment's, else the repo's .venv (made by tools/lab.sh or tools/test.sh), else python3
# (e.g. an active conda environment's). `make PYTHON=...` overrides. labengine is installed
# in that environment (editable); nothing here touches PYTHONPATH.
ifneq ($(VIRTUAL_ENV),)
PYTHON ?= python
else ifneq ($(wildcard .venv/bin/python),)
PYTHON ?= .venv/bin/python
else
PYTHON ?= python3
endif
# Jupyter refuses to run as root unless told (containers, CI).
JUPYTER_ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: help lab test test-notebooks notebooks exercises check-sync grade strip

help:
	@echo "make lab                    open JupyterLab on the lesson notebooks (labs/); set up first with bash tools/lab.sh"
	@echo "make test                   run the test suite (python -m pytest)"
	@echo "make test-notebooks         execute every lab and solution under nbval, plus tests/test_notebooks.py"
	@echo "make notebooks              rebuild labs/ and solutions/ from tools/notebooks/"
	@echo "make exercises              regenerate exercises/ from solutions/"
	@echo "make check-sync             fail if any generated notebook is out of date"
	@echo "make grade EX=ex1_5_1       grade a learner's exercise with the canonical checks"
	@echo "                            (EX: a path, e.g. EX=~/my_ex1_5_1.ipynb, or a name in exercises/)"

lab:
	$(PYTHON) -m jupyter lab --notebook-dir=. $(JUPYTER_ROOT_FLAG) labs/01_llm_class.ipynb

test:
	$(PYTHON) -m pytest

test-notebooks:
	$(PYTHON) -m pytest --nbval-lax --nbval-current-env labs solutions
	$(PYTHON) -m pytest tests/test_notebooks.py

notebooks:
	$(PYTHON) tools/build_notebooks.py
	$(PYTHON) tools/make_exercises.py

exercises:
	$(PYTHON) tools/make_exercises.py

check-sync:
	$(PYTHON) tools/build_notebooks.py --check
	$(PYTHON) tools/make_exercises.py --check

grade:
	@test -n "$(EX)" || { echo "usage: make grade EX=exercises/ex1_5_1_basic_inference.ipynb"; exit 2; }
	$(PYTHON) tools/grade.py "$(EX)"

strip:
	nbstripout labs/*.ipynb solutions/*.ipynb exercises/*.ipynb
