# Front end for the two README commands (and a few developer shortcuts).
.PHONY: demo test setup doctor unit netns kernel

demo:
	scripts/demo.sh

test:
	scripts/test.sh

setup:
	scripts/setup.sh

doctor: setup
	.venv/bin/mipmobike doctor

unit netns:
	TIERS=$@ scripts/test.sh

kernel:
	TIERS=kernel scripts/test.sh
