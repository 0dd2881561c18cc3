# Shared by scripts/gpu_kit.sh (here) and scripts/gpu_colocated_run.sh (on the GPU machine); source it.
# A device call carries at most 64 MiB with the working tree, so the kit travels as two folders, one per call of a
# warm lease, and files above PART_BYTES travel as parts.

# kit_split SRC DIR_A DIR_B PART_BYTES: every SRC/*.whl (split into NAME.part-aa, -ab, ... when larger than
# PART_BYTES) into DIR_A and DIR_B, largest piece first into the lighter folder; both get kit.sha256 (whole files
# and parts).
kit_split() {
  local src=$1 a=$2 b=$3 part=$4 tmp f size_a=0 size_b=0 size
  tmp=$(mktemp -d)
  rm -rf "$a" "$b"
  mkdir -p "$a" "$b"
  for f in "$src"/*.whl; do
    if [ "$(stat -c %s "$f")" -gt "$part" ]; then
      split -b "$part" "$f" "$tmp/$(basename "$f").part-"
    else
      cp "$f" "$tmp/"
    fi
  done
  { (cd "$src" && sha256sum -- *.whl); (cd "$tmp" && sha256sum -- *.part-* 2>/dev/null || true); } > "$tmp/kit.sha256.txt"
  for f in $(ls -S "$tmp" | grep -v '^kit\.sha256\.txt$'); do
    size=$(stat -c %s "$tmp/$f")
    if [ "$size_a" -le "$size_b" ]; then mv "$tmp/$f" "$a/"; size_a=$((size_a + size))
    else mv "$tmp/$f" "$b/"; size_b=$((size_b + size)); fi
  done
  cp "$tmp/kit.sha256.txt" "$a/kit.sha256"
  mv "$tmp/kit.sha256.txt" "$b/kit.sha256"
  rmdir "$tmp"
}

# kit_join DEST DIR...: the pieces of every DIR into DEST, parts joined, everything checked against kit.sha256.
kit_join() {
  local dest=$1 d base
  shift
  for d in "$@"; do
    if [ ! -f "$d/kit.sha256" ]; then
      echo "kit_join: $d/kit.sha256 is missing: carry $d (an earlier call's folder is gone when the machine was not warm)" >&2
      return 1
    fi
  done
  for d in "$@"; do
    if ! cmp -s "$1/kit.sha256" "$d/kit.sha256"; then
      echo "kit_join: $1 and $d come from different kits (kit.sha256 differs): run scripts/gpu_kit.sh once, carry both" >&2
      return 1
    fi
  done
  rm -rf "$dest"
  mkdir -p "$dest"
  for d in "$@"; do cp "$d"/* "$dest"/; done
  for base in $(ls "$dest" | sed -n 's/\.part-[a-z]*$//p' | sort -u); do
    cat "$dest/$base".part-* > "$dest/$base"
  done
  if ! (cd "$dest" && sha256sum --quiet -c kit.sha256); then
    echo "kit_join: the kit in $* does not match kit.sha256 (a folder of another kit, or a part missing)" >&2
    return 1
  fi
  rm -f "$dest"/*.part-*
}
