#!/usr/bin/env bash
# Build rlarith's image (the Containerfile) for real on a machine without a registry, for the image tests
# (tests/test_image.py, `make image-test`): podman and charliecloud from Debian packages, a stand-in for the
# pytorch base from debootstrap (container/standin.Containerfile), the image, and the image unpacked into a
# folder for `ch-run` (charliecloud: apptainer's model, a read-only image run as the host user).
#
#   container/testimage.sh setup   install what is missing (root, apt-get); build the stand-in base once
#   container/testimage.sh build   setup, then build the image (layer cache) and unpack it for ch-run
#   container/testimage.sh env     the `export` lines the tests need:  eval "$(container/testimage.sh env)"
#   container/testimage.sh purge   remove the images and the folder (the next setup starts from nothing)
#
# Folder: $RLARITH_IMAGE_DIR (default /var/tmp/rlarith-image): podman's configuration, the stand-in's
# build context, the unpacked image. Kept between runs on one machine: the stand-in base (debootstrap, torch)
# is built once; the image rebuilds from podman's layer cache. Why each setting:
# ../shared/notes/slurm-and-containers.md ("Containers") and docs/container.md.
set -euo pipefail

DIR=${RLARITH_IMAGE_DIR:-/var/tmp/rlarith-image}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PACKAGES=(podman runc uidmap debootstrap charliecloud-runtime)
DEBIAN=${RLARITH_IMAGE_DEBIAN:-localhost/rlarith-debian:bookworm}
STANDIN=${RLARITH_IMAGE_STANDIN:-localhost/rlarith-standin:torch-2.13.0}
IMAGE=${RLARITH_IMAGE:-localhost/rlarith:test}
CHDIR=$DIR/ch/rlarith
# A non-root host user for ch-run (charliecloud runs as whoever starts it; CI runs as root).
CH_USER=${RLARITH_CH_USER:-rlarith-ch}
export CONTAINERS_CONF=$DIR/containers.conf

say() { echo "testimage: $*"; }
die() {
	echo "testimage: error: $*" >&2
	exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

install_packages() {
	local missing=() p
	for p in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	((${#missing[@]} == 0)) && return 0
	[[ $(id -u) == 0 ]] || die "missing packages ${missing[*]}; run this as root once (apt-get install)"
	local t
	t=$(now)
	say "installing ${missing[*]}"
	# The lock timeout: another setup script (the SLURM cluster's) may be installing at the same moment.
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
		"${missing[@]}" >"$DIR/apt.log" 2>&1 || {
		apt-get -o DPkg::Lock::Timeout=600 update -q >>"$DIR/apt.log" 2>&1
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
			--no-install-recommends "${missing[@]}" >>"$DIR/apt.log" 2>&1
	} || die "apt-get install failed; see $DIR/apt.log"
	say "packages installed in $(since "$t") s"
}

configure_podman() {
	# crun 1.8 refuses this machine's hybrid cgroups ("cgroups in hybrid mode not supported"): runc. No
	# systemd as PID 1: cgroupfs. Root here lacks CAP_SYS_RESOURCE, so podman's default ulimits fail
	# setrlimit: lower ones.
	cat >"$DIR/containers.conf.tmp" <<-'EOF'
		[containers]
		default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
		[engine]
		runtime = "runc"
		cgroup_manager = "cgroupfs"
		events_logger = "file"
	EOF
	mv "$DIR/containers.conf.tmp" "$CONTAINERS_CONF"
	id "$CH_USER" >/dev/null 2>&1 || useradd --system --create-home --shell /bin/bash "$CH_USER"
}

# The mirror apt uses (debootstrap takes the same one).
mirror() {
	local uri
	uri=$(grep -rhoE '^(URIs:|deb)\s+\S+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
		awk '{print $2}' | grep -E '/debian/?$' | head -n1)
	echo "${uri:-http://deb.debian.org/debian}"
}

# pip's settings on this machine, as one pip.conf for the stand-in, and the local folders they name.
pip_conf() {
	local key value
	echo "[global]"
	for key in find-links extra-index-url index-url; do
		value=$(pip3 config get "global.$key" 2>/dev/null || true)
		[[ -z $value ]] && value=$(printenv "PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')" || true)
		if [[ -n $value ]]; then echo "$key = $value"; fi
	done
}
pip_folders() { # every local folder pip.conf names: bound read-only into the builds
	grep -oE '(file://)?/[^ ]+' "$DIR/standin/pip.conf" | sed -e 's|^file://||' -e 's|/simple/*$||' |
		while read -r d; do if [[ -d $d ]]; then echo "$d"; fi; done | sort -u
}
volumes() {
	local d
	for d in $(pip_folders); do printf -- '-v %s:%s:ro ' "$d" "$d"; done
}

build_standin() {
	if podman image exists "$STANDIN"; then
		say "stand-in base $STANDIN: cached"
		return 0
	fi
	local t rootfs=$DIR/rootfs
	t=$(now)
	if ! podman image exists "$DEBIAN"; then
		rm -rf "$rootfs.tmp"
		say "debootstrap bookworm from $(mirror)"
		debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
			bookworm "$rootfs.tmp" "$(mirror)" >"$DIR/debootstrap.log" 2>&1 ||
			die "debootstrap failed; see $DIR/debootstrap.log"
		tar -C "$rootfs.tmp" -c . | podman import - "$DEBIAN" >/dev/null
		rm -rf "$rootfs.tmp"
		say "debian base imported in $(since "$t") s"
	fi
	rm -rf "$DIR/standin" && mkdir -p "$DIR/standin/ca"
	cp /usr/local/share/ca-certificates/*.crt "$DIR/standin/ca/" 2>/dev/null || true
	pip_conf >"$DIR/standin/pip.conf"
	cp "$REPO/container/standin.Containerfile" "$DIR/standin/Containerfile"
	# shellcheck disable=SC2046
	podman build -q $(volumes) --build-arg DEBIAN="$DEBIAN" -t "$STANDIN" "$DIR/standin" >"$DIR/standin.log" 2>&1 ||
		die "the stand-in base did not build; see $DIR/standin.log"
	say "stand-in base built in $(since "$t") s"
}

setup() {
	mkdir -p "$DIR"
	install_packages
	configure_podman
	build_standin
}

build() {
	setup
	local t id
	t=$(now)
	# shellcheck disable=SC2046
	podman build $(volumes) -f "$REPO/Containerfile" -t "$IMAGE" --build-arg BASE_IMAGE="$STANDIN" \
		--build-arg GIT_COMMIT="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)" "$REPO" \
		>"$DIR/build.log" 2>&1 || {
		tail -n 30 "$DIR/build.log" >&2
		die "podman build failed; see $DIR/build.log"
	}
	say "image $IMAGE built in $(since "$t") s"
	id=$(podman image inspect --format '{{.Id}}' "$IMAGE")
	if [[ $(cat "$CHDIR.id" 2>/dev/null) != "$id" ]]; then
		# What `ch-convert -i podman -o dir IMAGE DIR` makes (a root filesystem and ch/environment, the
		# image's ENV for `ch-run --set-env`), in a sixth of its time: it compresses and unpacks a tarball.
		t=$(now)
		local mnt
		rm -rf "$CHDIR" "$CHDIR.id" && mkdir -p "$CHDIR"
		chmod 755 "$DIR" "$(dirname "$CHDIR")"
		mnt=$(podman image mount "$IMAGE")
		cp -a "$mnt/." "$CHDIR/"
		podman image unmount "$IMAGE" >/dev/null
		mkdir -p "$CHDIR/ch"
		podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" |
			grep . >"$CHDIR/ch/environment"
		echo "$id" >"$CHDIR.id"
		say "unpacked for ch-run in $(since "$t") s: $CHDIR"
	fi
}

env_lines() {
	echo "export CONTAINERS_CONF=$CONTAINERS_CONF"
	echo "export RLARITH_IMAGE=$IMAGE"
	echo "export RLARITH_CH_IMAGE=$CHDIR"
	echo "export RLARITH_CH_USER=$CH_USER"
}

purge() {
	podman rmi -f "$IMAGE" "$STANDIN" "$DEBIAN" >/dev/null 2>&1 || true
	rm -rf "$DIR"
}

case ${1:-} in
setup) setup ;;
build) build ;;
env) env_lines ;;
purge) purge ;;
*)
	echo "usage: $0 setup|build|env|purge" >&2
	exit 2
	;;
esac
