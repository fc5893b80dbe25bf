# The SomaVault built-in as first written, without the fast path (`fine`, `vm_violation`,
# `object_typed`): what the built-in must decide, checked by tests/vm.rs.
package soma.vault

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

violation contains {"msg": msg} if {
	asks_vault
	not params_typed
	msg := sprintf("the constraint's parameters are malformed, so the Vault settings cannot be checked: %s. Fix the constraint", [concat("; ", sort(param_errors))])
}

violation contains {"msg": msg} if {
	v = kv
	allowed = params.allowedAddresses
	address = v.address
	not listed(address, allowed)
	msg := sprintf("%s.credentials.vault.address %q is not a Vault that namespace %q may use; use one of [%s], or leave it unset for the operator's default", [at, address, namespace, listing(allowed)])
}

violation contains {"msg": msg} if {
	v = kv
	allowed = params.allowedAuthMethods
	method := object.get(v, "auth", "kubernetes")
	not listed(method, allowed)
	msg := sprintf("%s.credentials.vault.auth %q is not allowed in namespace %q; use one of [%s]", [at, method, namespace, listing(allowed)])
}

violation contains {"msg": msg} if {
	v = kv
	allowed = params.allowedAuthMounts
	mount = v.authMount
	not listed(mount, allowed)
	msg := sprintf("%s.credentials.vault.authMount %q is not an auth mount that namespace %q may log in at; use one of [%s], or leave it unset for the operator's default", [at, mount, namespace, listing(allowed)])
}

violation contains {"msg": msg} if {
	v = kv
	allowed = params.allowedRoles
	role = v.role
	not listed(role, allowed)
	msg := sprintf("%s.credentials.vault.role %q is not a Vault role that namespace %q may log in as; use one of [%s], or leave it unset for the operator's default", [at, role, namespace, listing(allowed)])
}

violation contains {"msg": msg} if {
	v = kv
	allowed = params.allowedVaultNamespaces
	vault_ns = v.namespace
	not listed(vault_ns, allowed)
	msg := sprintf("%s.credentials.vault.namespace %q is not a Vault namespace that namespace %q may use; use one of [%s], or leave it unset", [at, vault_ns, namespace, listing(allowed)])
}

violation contains {"msg": msg} if {
	allowed = params.allowedKvPathPrefixes
	read = kv_read
	not under_any(read, allowed)
	msg := sprintf("%s.credentials.vault reads %s, outside the paths that namespace %q may read: [%s]; keep the key under one of them (mount and path), or ask your platform team", [at, read, namespace, listing(allowed)])
}

violation contains {"msg": msg} if {
	l = ledger
	allowed = params.allowedLedgerMounts
	mount = l.mount
	not listed(mount, allowed)
	msg := sprintf("%s.ledgerCredentials.vault.mount %q is not a database secrets engine that namespace %q may use; use one of [%s], or leave it unset for the operator's default", [at, mount, namespace, listing(allowed)])
}

violation contains {"msg": msg} if {
	l = ledger
	allowed = params.allowedLedgerRoles
	role = l.role
	not listed(role, allowed)
	msg := sprintf("%s.ledgerCredentials.vault.role %q is not a database role that namespace %q may take ledger users from; use one of [%s], or leave it unset for the operator's default", [at, role, namespace, listing(allowed)])
}

violation contains {"msg": msg} if {
	v = kv
	some field in ["mount", "path", "authMount"]
	value = v[field]
	not plain_path(value)
	msg := sprintf("%s.credentials.vault.%s %q is not a plain Vault path: write it without empty, \".\" or \"..\" segments and without %%, \\, ? or #, such as teams/research/openai", [at, field, value])
}

violation contains {"msg": msg} if {
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
	api_form := concat("", [mount, "/data/"])
	rel := kv_rel(path, api_form)
}

kv_rel(path, api_form) := substring(path, count(api_form), -1) if startswith(path, api_form)

kv_rel(path, api_form) := path if not startswith(path, api_form)

# `x` is one of `values`, "{namespace}" standing for the object's namespace (a value that
# names the namespace matches nothing when the object has none).
listed(x, values) if {
	some value in values
	namespace_fills(value)
	trim(replace(value, "{namespace}", namespace), "/") == trim(x, "/")
}

namespace_fills(_) if namespace != ""

namespace_fills(value) if not contains(value, "{namespace}")

listing(values) := replace(concat(", ", values), "{namespace}", namespace)

# `path` is a prefix or lies under one, by whole segments.
under_any(path, prefixes) if {
	some prefix in prefixes
	namespace_fills(prefix)
	under(path, trim(replace(prefix, "{namespace}", namespace), "/"))
}

under(path, prefix) if path == prefix

under(path, prefix) if startswith(path, concat("", [prefix, "/"]))

plain_path(p) if {
	is_string(p)
	wrapped := concat("", ["/", trim(p, "/"), "/"])
	not contains(wrapped, "//")
	not contains(wrapped, "/./")
	not contains(wrapped, "/../")
	not contains(p, "%")
	not contains(p, "\\")
	not contains(p, "?")
	not contains(p, "#")
}

# The parameters.

parameter_names := {
	"allowedAddresses", "allowedAuthMethods", "allowedAuthMounts", "allowedRoles",
	"allowedVaultNamespaces", "allowedKvPathPrefixes", "allowedLedgerMounts", "allowedLedgerRoles",
}

auth_methods := {"kubernetes", "jwt", "appRole"}

params_typed if count(param_errors) == 0

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
