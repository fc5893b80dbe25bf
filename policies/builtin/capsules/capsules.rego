# Capsules are signed by a trusted identity and carry the hash of the policy they were
# reviewed against.
#
# This policy checks what a Capsule declares; the signature itself is verified by the operator
# (Cosign) before any agent may use the Capsule.
# Parameters:
#   trustedKeys: [{name: capsule-signers, key: cosign.pub}]      # ConfigMap keys holding keys
#   trustedIdentities: [{issuer: "https://token.actions.githubusercontent.com",
#                        subject: "https://github.com/acme/kb/.github/workflows/publish.yaml@refs/heads/main"}]
#                      # or subjectRegExp instead of subject
#   allowedPolicyHashes: ["sha256:..."]                           # absent: any well-formed hash
#   (with neither trustedKeys nor trustedIdentities, any declared signer is accepted)
#
# Layout: see sandbox.rego (`problems`, `fine`, `vm_violation`, `params_typed`, `object_typed`).
# `allowed = …` rather than `:=`: an absent parameter must stop the body in the VM too.
package soma.capsules

violation contains v if {
	not fine
	some v in problems
}

vm_violation := set() if fine
else := violation if object_typed

obj := input.review.object

spec := object.get(obj, "spec", {})

sig := object.get(spec, "signature", {})

problems contains {"msg": msg} if {
	obj.kind == "Capsule"
	not valid_hash(object.get(spec, "policyHash", ""))
	msg := sprintf("Capsule %q needs spec.policyHash, the sha256:<64 hex> hash of the policy set it was reviewed against (got %q)", [obj.metadata.name, object.get(spec, "policyHash", "")])
}

valid_hash(h) if {
	startswith(h, "sha256:")
	hex_digits := substring(h, 7, -1)
	count(hex_digits) == 64
	trim(hex_digits, "0123456789abcdef") == ""
}

problems contains {"msg": msg} if {
	obj.kind == "Capsule"
	allowed = input.parameters.allowedPolicyHashes
	h := spec.policyHash
	valid_hash(h)
	not h in allowed
	msg := sprintf("Capsule %q was reviewed against policy %s, which is not an approved policy set; review it against a current one and publish a new version", [obj.metadata.name, h])
}

problems contains {"msg": msg} if {
	obj.kind == "Capsule"
	not sig.publicKeyRef
	not sig.keyless
	msg := sprintf("Capsule %q names no signer: set spec.signature.publicKeyRef or spec.signature.keyless", [obj.metadata.name])
}

restricted if input.parameters.trustedKeys

restricted if input.parameters.trustedIdentities

problems contains {"msg": msg} if {
	obj.kind == "Capsule"
	restricted
	declared_signer
	not trusted_key
	not trusted_identity
	msg := sprintf("Capsule %q is signed by %s, which is not a trusted signer; trusted: %s", [obj.metadata.name, describe_signer, describe_trusted])
}

declared_signer if sig.publicKeyRef

declared_signer if sig.keyless

trusted_key if {
	some k in object.get(input.parameters, "trustedKeys", [])
	k.name == sig.publicKeyRef.name
	k.key == sig.publicKeyRef.key
}

trusted_identity if {
	some id in object.get(input.parameters, "trustedIdentities", [])
	id.issuer == sig.keyless.issuer
	id.subject == sig.keyless.subject
}

trusted_identity if {
	some id in object.get(input.parameters, "trustedIdentities", [])
	id.issuer == sig.keyless.issuer
	regex.match(id.subjectRegExp, sig.keyless.subject)
}

describe_signer := concat(" and ", [s | some s in signer_parts])

signer_parts contains sprintf("the key %s/%s", [sig.publicKeyRef.name, sig.publicKeyRef.key]) if sig.publicKeyRef

signer_parts contains sprintf("the identity %s (issuer %s)", [sig.keyless.subject, sig.keyless.issuer]) if sig.keyless

describe_trusted := concat("; ", array.concat(
	[sprintf("key %s/%s", [k.name, k.key]) | some k in object.get(input.parameters, "trustedKeys", [])],
	[sprintf("identity %s (issuer %s)", [object.get(id, "subject", object.get(id, "subjectRegExp", "")), id.issuer]) | some id in object.get(input.parameters, "trustedIdentities", [])],
))

# Fast path: a well-formed, approved hash and a declared signer that is trusted (or no
# restriction). Not for Capsules signed both ways.
fine if input.review.object.kind != "Capsule"

fine if {
	input.review.object.kind == "Capsule"
	h := spec.policyHash
	is_string(h)
	valid_hash(h)
	hash_approved(h)
	is_array(object.get(input.parameters, "trustedKeys", []))
	is_array(object.get(input.parameters, "trustedIdentities", []))
	signer_fine
}

hash_approved(_) if not "allowedPolicyHashes" in object.keys(input.parameters)

hash_approved(h) if h in input.parameters.allowedPolicyHashes

signer_fine if {
	sig.publicKeyRef
	not sig.keyless
	not restricted
}

signer_fine if {
	sig.keyless
	not sig.publicKeyRef
	not restricted
}

signer_fine if {
	sig.publicKeyRef
	trusted_key
}

signer_fine if {
	sig.keyless
	trusted_identity
}

params_typed if {
	is_object(input.parameters)
	is_array(object.get(input.parameters, "allowedPolicyHashes", []))
	is_array(object.get(input.parameters, "trustedKeys", []))
	every k in object.get(input.parameters, "trustedKeys", []) {
		is_object(k)
		is_string(k.name)
		is_string(k.key)
	}
	is_array(object.get(input.parameters, "trustedIdentities", []))
	every id in object.get(input.parameters, "trustedIdentities", []) {
		identity_typed(id)
	}
}

identity_typed(id) if {
	is_object(id)
	is_string(id.issuer)
	is_string(id.subject)
	not "subjectRegExp" in object.keys(id)
}

identity_typed(id) if {
	is_object(id)
	is_string(id.issuer)
	is_string(id.subjectRegExp)
	regex.is_valid(id.subjectRegExp)
	not "subject" in object.keys(id)
}

object_typed if input.review.object.kind != "Capsule"

object_typed if {
	is_string(input.review.object.metadata.name)
	is_object(spec)
	is_string(object.get(spec, "policyHash", ""))
	is_object(sig)
	is_object(object.get(sig, "publicKeyRef", {}))
	is_string(object.get(sig, ["publicKeyRef", "name"], ""))
	is_string(object.get(sig, ["publicKeyRef", "key"], ""))
	is_object(object.get(sig, "keyless", {}))
	is_string(object.get(sig, ["keyless", "issuer"], ""))
	is_string(object.get(sig, ["keyless", "subject"], ""))
}
