package soma.images_test

import data.soma.images

digest := "sha256:0d7c1f5e2b8a4c3d9e6f7a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d"

agent(img) := {"review": {"object": {"kind": "Agent", "spec": {"image": img}}}, "parameters": {"allowedRegistries": ["registry.example.com", "ghcr.io/acme/"]}}

test_pinned_allowed_image_passes if {
	count(images.violation) == 0 with input as agent(concat("@", ["registry.example.com/agents/a", digest]))
}

test_tag_only_image_is_denied if {
	some v in images.violation with input as agent("registry.example.com/agents/a:1.2")
	contains(v.msg, "not pinned by digest")
	contains(v.msg, "registry.example.com/agents/a@sha256:<digest>")
}

test_tag_and_digest_is_pinned if {
	count(images.violation) == 0 with input as agent(concat("@", ["registry.example.com/agents/a:1.2", digest]))
}

test_other_registry_is_denied if {
	some v in images.violation with input as agent(concat("@", ["quay.io/x/a", digest]))
	contains(v.msg, "not from an allowed registry")
	contains(v.msg, `"quay.io"`)
}

test_lookalike_registry_is_denied if {
	some v in images.violation with input as agent(concat("@", ["registry.example.com.evil.io/a", digest]))
	contains(v.msg, "not from an allowed registry")
}

test_registry_path_prefix if {
	count(images.violation) == 0 with input as agent(concat("@", ["ghcr.io/acme/a", digest]))
	count(images.violation) == 1 with input as agent(concat("@", ["ghcr.io/other/a", digest]))
}

test_docker_hub_short_name_is_normalized if {
	some v in images.violation with input as agent(concat("@", ["nginx", digest]))
	contains(v.msg, `"docker.io"`)
}

test_job_template_image_is_checked if {
	inp := {"review": {"object": {"kind": "Job", "spec": {"template": {"image": "busybox:latest"}}}}, "parameters": {}}
	count(images.violation) == 1 with input as inp
}

test_no_registry_list_allows_any_registry if {
	inp := {"review": {"object": {"kind": "Agent", "spec": {"image": concat("@", ["quay.io/x/a", digest])}}}, "parameters": {}}
	count(images.violation) == 0 with input as inp
}

test_digest_requirement_can_be_switched_off if {
	inp := {"review": {"object": {"kind": "Agent", "spec": {"image": "registry.example.com/a:1"}}}, "parameters": {"requireDigest": false}}
	count(images.violation) == 0 with input as inp
}
