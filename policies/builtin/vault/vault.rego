# What an Agent (or inline Job template) may ask Vault for, per namespace.
#
# Applies to spec.credentials.vault and spec.ledgerCredentials.vault of an Agent and to
# spec.template.credentials.vault and spec.template.ledgerCredentials.vault of a Job (a Job on
# an agentRef runs with that Agent's settings, checked when the Agent was admitted).
# Parameters, each a list of strings; "{namespace}" in a value stands for the object's
# namespace. An absent parameter switches its check off; present (even empty) it is enforced.
# A field the object leaves unset gets the operator's default (--vault-*, chart vault.*),
# which the platform team chose, and is not checked:
#   allowedAddresses: ["https://vault.vault.svc:8200"]   # credentials.vault.address
#   allowedAuthMethods: [kubernetes, jwt]                # credentials.vault.auth (unset: kubernetes,
#                                                        # which is checked)
#   allowedAuthMounts: [kubernetes]                      # credentials.vault.authMount
#   allowedRoles: ["{namespace}-agents"]                 # credentials.vault.role
#   allowedVaultNamespaces: ["tenants/{namespace}"]      # credentials.vault.namespace
#   allowedKvPathPrefixes: ["secret/data/{namespace}/"]  # the secret read, <mount>/data/<path>
#                                                        # (mount unset: secret, which is
#                                                        # checked); whole path segments
#   allowedLedgerMounts: [database]                      # ledgerCredentials.vault.mount
#   allowedLedgerRoles: ["ledger-{namespace}"]           # ledgerCredentials.vault.role
# Values are compared with leading and trailing "/" removed. Always, whatever the parameters:
# the KV mount and path, the auth mount and the ledger mount and role are plain paths (no
# empty, "." or ".." segment, none of % \ ? #): the sidecar's HTTP client would resolve them
# and read outside the path these checks saw. Malformed parameters deny every object that
# asks Vault for anything, with a message naming the parameter.
#
# Layout: see sandbox.rego (`problems`, `fine`, `vm_violation`, `params_typed`, `object_typed`).
# Bindings that may be undefined use `=`, which stops the body in the VM too.
package soma.vault

violation contains v if {
	not fine
	some v in problems
}

vm_violation := set() if fine
else := violation if object_typed

# Where the Agent spec is.
spec := object.get(input.review.object, "spec", {}) if input.review.object.kind == "Agent"

spec := object.get(input.review.object, ["spec", "template"], {}) if input.review.object.kind == "Job"

at := "spec" if input.review.object.kind == "Agent"

at := "spec.template" if input.review.object.kind == "Job"

kv := v if {
	is_object(spec)
	v := object.get(spec, ["credentials", "vault"], null)
	is_object(v)
}

ledger := v if {
	is_object(spec)
	v := object.get(spec, ["ledgerCredentials", "vault"], null)
	is_object(v)
}

asks_vault if kv

asks_vault if ledger

namespace := input.review.namespace if {
	input.review.namespace != ""
} else := object.get(input.review.object, ["metadata", "namespace"], "")

# The parameters, when well-formed; otherwise the checks below stay silent and the malformed
# parameters are the problem.
params := input.parameters if params_typed

problems contains {"msg": msg} if {
	asks_vault
	not params_typed
	msg := sprintf("the constraint's parameters are malformed, so the Vault settings cannot be checked: %s. Fix the constraint", [concat("; ", sort(param_errors))])
}

problems contains {"msg": msg} if {
	v = kv
	allowed = params.allowedAddresses
	address = v.address
	not listed(address, allowed)
	msg := sprintf("%s.credentials.vault.address %q is not a Vault that namespace %q may use; use one of [%s], or leave it unset for the operator's default", [at, address, namespace, listing(allowed)])
}

problems contains {"msg": msg} if {
	v = kv
	allowed = params.allowedAuthMethods
	method := object.get(v, "auth", "kubernetes")
	not listed(method, allowed)
	msg := sprintf("%s.credentials.vault.auth %q is not allowed in namespace %q; use one of [%s]", [at, method, namespace, listing(allowed)])
}

problems contains {"msg": msg} if {
	v = kv
	allowed = params.allowedAuthMounts
	mount = v.authMount
	not listed(mount, allowed)
	msg := sprintf("%s.credentials.vault.authMount %q is not an auth mount that namespace %q may log in at; use one of [%s], or leave it unset for the operator's default", [at, mount, namespace, listing(allowed)])
}

problems contains {"msg": msg} if {
	v = kv
	allowed = params.allowedRoles
	role = v.role
	not listed(role, allowed)
	msg := sprintf("%s.credentials.vault.role %q is not a Vault role that namespace %q may log in as; use one of [%s], or leave it unset for the operator's default", [at, role, namespace, listing(allowed)])
}

problems contains {"msg": msg} if {
	v = kv
	allowed = params.allowedVaultNamespaces
	vault_ns = v.namespace
	not listed(vault_ns, allowed)
	msg := sprintf("%s.credentials.vault.namespace %q is not a Vault namespace that namespace %q may use; use one of [%s], or leave it unset", [at, vault_ns, namespace, listing(allowed)])
}

problems contains {"msg": msg} if {
	allowed = params.allowedKvPathPrefixes
	read = kv_read
	not under_any(read, allowed)
	msg := sprintf("%s.credentials.vault reads %s, outside the paths that namespace %q may read: [%s]; keep the key under one of them (mount and path), or ask your platform team", [at, read, namespace, listing(allowed)])
}

problems contains {"msg": msg} if {
	l = ledger
	allowed = params.allowedLedgerMounts
	mount = l.mount
	not listed(mount, allowed)
	msg := sprintf("%s.ledgerCredentials.vault.mount %q is not a database secrets engine that namespace %q may use; use one of [%s], or leave it unset for the operator's default", [at, mount, namespace, listing(allowed)])
}

problems contains {"msg": msg} if {
	l = ledger
	allowed = params.allowedLedgerRoles
	role = l.role
	not listed(role, allowed)
	msg := sprintf("%s.ledgerCredentials.vault.role %q is not a database role that namespace %q may take ledger users from; use one of [%s], or leave it unset for the operator's default", [at, role, namespace, listing(allowed)])
}

problems contains {"msg": msg} if {
	v = kv
	some field in ["mount", "path", "authMount"]
	value = v[field]
	not plain_path(value)
	msg := sprintf("%s.credentials.vault.%s %q is not a plain Vault path: write it without empty, \".\" or \"..\" segments and without %%, \\, ? or #, such as teams/research/openai", [at, field, value])
}

problems contains {"msg": msg} if {
	l = ledger
	some field in ["mount", "role"]
	value = l[field]
	not plain_path(value)
	msg := sprintf("%s.ledgerCredentials.vault.%s %q is not a plain Vault path: write it without empty, \".\" or \"..\" segments and without %%, \\, ? or #", [at, field, value])
}

# The KV v2 path the sidecar reads: <mount>/data/<path>, `path` in either form (within the
# mount, or the API form <mount>/data/...), as the sidecar reads it (contract `kv_path`).
kv_read := concat("/", [mount, "data", rel]) if {
	v = kv
	mount := trim(object.get(v, "mount", "secret"), "/")
	path := trim(object.get(v, "path", ""), "/")
	rel := trim_prefix(path, concat("", [mount, "/data/"]))
}

# `x` is one of `values`, "{namespace}" standing for the object's namespace (a value that
# names the namespace matches nothing when the object has none). Spelled without rule calls
# inside the loop: they are what cost in the VM.
listed(x, values) if {
	ns := namespace
	some value in values
	[ns, contains(value, "{namespace}")] != ["", true]
	trim(replace(value, "{namespace}", ns), "/") == trim(x, "/")
}

listing(values) := replace(concat(", ", values), "{namespace}", namespace)

# `path` is a prefix or lies under one, by whole segments: "<path>/" starts with "<prefix>/".
under_any(path, prefixes) if {
	ns := namespace
	some prefix in prefixes
	[ns, contains(prefix, "{namespace}")] != ["", true]
	startswith(concat("", [path, "/"]), concat("", [trim(replace(prefix, "{namespace}", ns), "/"), "/"]))
}

# No empty, "." or ".." segment in "/<p without leading or trailing />/", and none of % \ ? #
# in it: removing them all changes nothing (one built-in call rather than seven `contains`).
plain_path(p) if {
	is_string(p)
	wrapped := concat("", ["/", trim(p, "/"), "/"])
	strings.replace_n({"//": "", "/./": "", "/../": "", "%": "", "\\": "", "?": "", "#": ""}, wrapped) == wrapped
}

# Fast path: nothing asked of Vault (most objects), in bodies without rule calls (they are
# what cost in the VM, and the VM stops at the first body that holds); each holds exactly when
# `kv` and `ledger` are undefined. Otherwise: the checks above found nothing on an object of
# the expected types (so that none of them could have failed).
fine if {
	input.review.object.kind == "Agent"
	not is_object(object.get(input.review.object, ["spec", "credentials", "vault"], null))
	not is_object(object.get(input.review.object, ["spec", "ledgerCredentials", "vault"], null))
}

fine if {
	input.review.object.kind == "Job"
	not is_object(object.get(input.review.object, ["spec", "template", "credentials", "vault"], null))
	not is_object(object.get(input.review.object, ["spec", "template", "ledgerCredentials", "vault"], null))
}

fine if not input.review.object.kind in {"Agent", "Job"}

fine if {
	asks_vault
	object_typed
	count(problems) == 0
}

# The parameters.

parameter_names := {
	"allowedAddresses", "allowedAuthMethods", "allowedAuthMounts", "allowedRoles",
	"allowedVaultNamespaces", "allowedKvPathPrefixes", "allowedLedgerMounts", "allowedLedgerRoles",
}

auth_methods := {"kubernetes", "jwt", "appRole"}

# Holds exactly when `param_errors` is empty; spelled without rule calls, since the VM
# evaluates it for every object that asks Vault for something.
params_typed if {
	is_object(input.parameters)
	every name, value in input.parameters {
		name in {
			"allowedAddresses", "allowedAuthMethods", "allowedAuthMounts", "allowedRoles",
			"allowedVaultNamespaces", "allowedKvPathPrefixes", "allowedLedgerMounts", "allowedLedgerRoles",
		}
		is_array(value)
		every s in value {
			is_string(s)
		}
	}
	every m in object.get(input.parameters, "allowedAuthMethods", []) {
		m in {"kubernetes", "jwt", "appRole"}
	}
}

param_errors contains "parameters must be an object of lists of strings" if not is_object(input.parameters)

param_errors contains msg if {
	is_object(input.parameters)
	some name, _ in input.parameters
	not name in parameter_names
	msg := sprintf("unknown parameter %q (known: %s)", [name, concat(", ", sort(parameter_names))])
}

param_errors contains msg if {
	is_object(input.parameters)
	some name, value in input.parameters
	name in parameter_names
	not strings(value)
	msg := sprintf("%s must be a list of strings, not %v", [name, value])
}

param_errors contains msg if {
	is_object(input.parameters)
	methods := object.get(input.parameters, "allowedAuthMethods", [])
	strings(methods)
	some m in methods
	not m in auth_methods
	msg := sprintf("allowedAuthMethods has %q; the methods are appRole, jwt and kubernetes", [m])
}

strings(a) if {
	is_array(a)
	every s in a {
		is_string(s)
	}
}

# Every field the checks read has the type they expect.
object_typed if {
	is_string(namespace)
	kv_typed
	ledger_typed
}

kv_typed if not kv

kv_typed if {
	v = kv
	every field in ["address", "namespace", "mount", "path", "auth", "authMount", "role"] {
		is_string(object.get(v, field, ""))
	}
}

ledger_typed if not ledger

ledger_typed if {
	l = ledger
	is_string(object.get(l, "mount", ""))
	is_string(object.get(l, "role", ""))
}
