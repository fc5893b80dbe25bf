# Agent images come from allowed registries and are pinned by digest.
#
# Applies to an Agent's spec.image and an inline Job template's spec.template.image.
# Parameters:
#   allowedRegistries: ["registry.example.com", "ghcr.io/acme/"]  (absent: any registry)
#   requireDigest: true                                           (default true)
#
# Layout: see sandbox.rego (`problems`, `fine`, `vm_violation`, `params_typed`, `object_typed`).
package soma.images

violation contains v if {
	not fine
	some v in problems
}

vm_violation := set() if fine
else := violation if object_typed

# Every image the object would run.
images contains input.review.object.spec.image if input.review.object.kind == "Agent"

images contains input.review.object.spec.template.image if input.review.object.kind == "Job"

problems contains {"msg": msg, "details": {"image": img}} if {
	object.get(input.parameters, "requireDigest", true) == true
	some img in images
	not pinned(img)
	msg := sprintf("image %q is not pinned by digest: use %s@sha256:<digest> (for example from `crane digest` or `docker buildx imagetools inspect`) so the image that runs is the one that was reviewed", [img, repository(img)])
}

problems contains {"msg": msg, "details": {"image": img, "allowedRegistries": allowed}} if {
	allowed := input.parameters.allowedRegistries
	some img in images
	not allowed_registry(normalize(img), allowed)
	msg := sprintf("image %q is not from an allowed registry; push it to one of [%s] or ask your platform team to allow %q", [img, concat(", ", allowed), registry(normalize(img))])
}

# `…@sha256:<64 lower-case hex>`. String built-ins rather than a regex: a regex match costs
# more than the rest of this policy (see docs/policies.md, "Performance").
pinned(img) if {
	parts := split(img, "@")
	count(parts) == 2
	startswith(parts[1], "sha256:")
	hex_digits := substring(parts[1], 7, -1)
	count(hex_digits) == 64
	trim(hex_digits, "0123456789abcdef") == ""
}

# The image reference without its digest or tag.
repository(img) := repo if {
	no_digest := split(img, "@")[0]
	parts := split(no_digest, "/")
	last := parts[count(parts) - 1]
	name := split(last, ":")[0]
	repo := concat("/", array.concat(array.slice(parts, 0, count(parts) - 1), [name]))
}

# Docker Hub short names (`nginx`, `library/nginx`) are spelled out, so that an allow-list of
# `docker.io` means what it says and `registry.example.com.evil.io` never matches
# `registry.example.com`.
normalize(img) := img if has_registry(img)

normalize(img) := concat("", ["docker.io/", img]) if {
	not has_registry(img)
	contains(img, "/")
}

normalize(img) := concat("", ["docker.io/library/", img]) if {
	not has_registry(img)
	not contains(img, "/")
}

has_registry(img) if {
	parts := split(img, "/")
	count(parts) > 1
	first := parts[0]
	registry_like(first)
}

registry_like(s) if contains(s, ".")

registry_like(s) if contains(s, ":")

registry_like(s) if s == "localhost"

registry(img) := split(img, "/")[0]

allowed_registry(img, allowed) if {
	some prefix in allowed
	startswith(img, with_slash(prefix))
}

with_slash(prefix) := prefix if endswith(prefix, "/")

with_slash(prefix) := concat("", [prefix, "/"]) if not endswith(prefix, "/")

# Fast path: every image pinned, from an allowed registry named by host (a dot in the first
# path component, so no Docker Hub spelling applies). Also true without an image (a Job that
# runs an existing Agent). The first two bodies are the last one for the one image of an Agent
# or a Job's inline template, without rule calls (they are what cost in the VM): with and
# without `allowedRegistries`.
fine if {
	path = {"Agent": ["spec", "image"], "Job": ["spec", "template", "image"]}[input.review.object.kind]
	img := object.get(input.review.object, path, null)
	is_string(img)
	count(img) > 72
	digest := substring(img, count(img) - 72, -1)
	startswith(digest, "@sha256:")
	trim(substring(digest, 8, -1), "0123456789abcdef") == ""
	count(split(img, "@")) == 2
	some prefix in input.parameters.allowedRegistries
	startswith(img, concat("", [trim_suffix(prefix, "/"), "/"]))
	contains(split(img, "/")[0], ".")
}

fine if {
	is_object(input.parameters)
	not "allowedRegistries" in object.keys(input.parameters)
	path = {"Agent": ["spec", "image"], "Job": ["spec", "template", "image"]}[input.review.object.kind]
	img := object.get(input.review.object, path, null)
	is_string(img)
	count(img) > 72
	digest := substring(img, count(img) - 72, -1)
	startswith(digest, "@sha256:")
	trim(substring(digest, 8, -1), "0123456789abcdef") == ""
	count(split(img, "@")) == 2
}

fine if {
	every img in images {
		pinned_fast(img)
		registry_fine(img)
	}
}

pinned_fast(img) if {
	is_string(img)
	count(img) > 72
	digest := substring(img, count(img) - 72, -1)
	startswith(digest, "@sha256:")
	trim(substring(digest, 8, -1), "0123456789abcdef") == ""
	count(split(img, "@")) == 2
}

registry_fine(_) if not "allowedRegistries" in object.keys(input.parameters)

registry_fine(img) if {
	some prefix in input.parameters.allowedRegistries
	startswith(img, concat("", [trim_suffix(prefix, "/"), "/"]))
	contains(split(img, "/")[0], ".")
}

params_typed if {
	is_object(input.parameters)
	registries := object.get(input.parameters, "allowedRegistries", [])
	is_array(registries)
	every prefix in registries {
		is_string(prefix)
	}
}

object_typed if {
	every img in images {
		is_string(img)
	}
}
