package soma.capsules_test

import data.soma.capsules

hash := "sha256:9b8a7c6d5e4f30211a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081"

params := {
	"trustedKeys": [{"name": "capsule-signers", "key": "cosign.pub"}],
	"trustedIdentities": [
		{"issuer": "https://token.actions.githubusercontent.com", "subjectRegExp": "^https://github\\.com/acme/.+@refs/heads/main$"},
		{"issuer": "https://accounts.google.com", "subject": "kb-publisher@acme.example"},
	],
}

capsule(spec) := {"review": {"object": {"kind": "Capsule", "metadata": {"name": "kb"}, "spec": spec}}, "parameters": params}

key_signed := {"policyHash": hash, "signature": {"publicKeyRef": {"name": "capsule-signers", "key": "cosign.pub"}}}

test_trusted_key_passes if {
	count(capsules.violation) == 0 with input as capsule(key_signed)
}

test_untrusted_key_is_denied if {
	spec := object.union(key_signed, {"signature": {"publicKeyRef": {"name": "my-keys", "key": "cosign.pub"}}})
	some v in capsules.violation with input as capsule(spec)
	contains(v.msg, "the key my-keys/cosign.pub, which is not a trusted signer")
}

test_trusted_keyless_exact_subject if {
	spec := {"policyHash": hash, "signature": {"keyless": {"issuer": "https://accounts.google.com", "subject": "kb-publisher@acme.example"}}}
	count(capsules.violation) == 0 with input as capsule(spec)
}

test_trusted_keyless_subject_pattern if {
	spec := {"policyHash": hash, "signature": {"keyless": {"issuer": "https://token.actions.githubusercontent.com", "subject": "https://github.com/acme/kb/.github/workflows/publish.yaml@refs/heads/main"}}}
	count(capsules.violation) == 0 with input as capsule(spec)
}

test_keyless_from_wrong_issuer if {
	spec := {"policyHash": hash, "signature": {"keyless": {"issuer": "https://evil.example", "subject": "kb-publisher@acme.example"}}}
	count(capsules.violation) == 1 with input as capsule(spec)
}

test_keyless_from_fork_branch if {
	spec := {"policyHash": hash, "signature": {"keyless": {"issuer": "https://token.actions.githubusercontent.com", "subject": "https://github.com/acme/kb/.github/workflows/publish.yaml@refs/heads/feature"}}}
	count(capsules.violation) == 1 with input as capsule(spec)
}

test_missing_policy_hash if {
	spec := object.remove(key_signed, ["policyHash"])
	some v in capsules.violation with input as capsule(spec)
	contains(v.msg, "needs spec.policyHash")
}

test_malformed_policy_hash if {
	spec := object.union(key_signed, {"policyHash": "md5:abc"})
	count(capsules.violation) == 1 with input as capsule(spec)
}

test_policy_hash_not_approved if {
	inp := {"review": {"object": {"kind": "Capsule", "metadata": {"name": "kb"}, "spec": key_signed}}, "parameters": object.union(params, {"allowedPolicyHashes": ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]})}
	some v in capsules.violation with input as inp
	contains(v.msg, "not an approved policy set")
}

test_no_signer if {
	some v in capsules.violation with input as capsule({"policyHash": hash})
	contains(v.msg, "names no signer")
}

test_without_trust_parameters_any_signer if {
	inp := {"review": {"object": {"kind": "Capsule", "metadata": {"name": "kb"}, "spec": object.union(key_signed, {"signature": {"publicKeyRef": {"name": "x", "key": "y"}}})}}, "parameters": {}}
	count(capsules.violation) == 0 with input as inp
}
