#!/usr/bin/env bash
# Fetch two real chest CTs with tumour masks from the pyradiomics 3.0.1 *source* package on PyPI
# (BSD-3), check its sha256 and unpack only the NRRD files the tests use. Idempotent.
set -euo pipefail
DEST="${PRIVSEG_TESTDATA:-.cache/testdata}"
SHA=47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5
PY="${PYTHON:-.venv/bin/python}"
if [ -f "$DEST/pyradiomics/lung2_label.nrrd" ]; then exit 0; fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation -d "$TMP" pyradiomics==3.0.1
ARCHIVE="$(ls "$TMP"/pyradiomics-3.0.1.tar.gz)"
echo "$SHA  $ARCHIVE" | sha256sum -c --quiet -
mkdir -p "$TMP/x" "$DEST/pyradiomics.partial"
tar -xzf "$ARCHIVE" -C "$TMP/x" --wildcards '*/data/lung[12]_*.nrrd'
cp "$TMP"/x/pyradiomics-3.0.1/data/lung[12]_{image,label}.nrrd "$DEST/pyradiomics.partial/"
rm -rf "$DEST/pyradiomics"
mv "$DEST/pyradiomics.partial" "$DEST/pyradiomics"
echo "real CT test data in $DEST/pyradiomics"
