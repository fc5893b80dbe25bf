package soma.vault_test

import data.soma.vault

params := {
	"allowedAddresses": ["https://vault.vault.svc:8200/"],
	"allowedAuthMethods": ["kubernetes", "appRole"],
	"allowedAuthMounts": ["kubernetes"],
	"allowedRoles": ["{namespace}-agents"],
	"allowedVaultNamespaces": ["tenants/{namespace}"],
	"allowedKvPathPrefixes": ["secret/data/{namespace}/"],
	"allowedLedgerMounts": ["database"],
	"allowedLedgerRoles": ["ledger-{namespace}"],
}

good := {
	"address": "https://vault.vault.svc:8200",
	"namespace": "tenants/team-a",
	"path": "team-a/openai",
	"key": "api-key",
	"auth": "kubernetes",
	"authMount": "kubernetes",
	"role": "team-a-agents",
}

agent(kv, p) := {"review": {"namespace": "team-a", "object": {"kind": "Agent", "metadata": {"namespace": "team-a"}, "spec": {"credentials": {"vault": kv}}}}, "parameters": p}

with_ledger(inp, l) := json.patch(inp, [{"op": "add", "path": "/review/object/spec/ledgerCredentials", "value": {"vault": l}}])

messages(inp) := ms if {
	vs := vault.violation with input as inp
	ms := {v.msg | some v in vs}
}

test_own_namespace_passes if {
	count(vault.violation) == 0 with input as with_ledger(agent(good, params), {"mount": "database", "role": "ledger-team-a"})
	vault.fine with input as agent(good, params)
}

test_no_vault_is_the_fast_path if {
	inp := {"review": {"namespace": "team-a", "object": {"kind": "Agent", "spec": {"credentials": {"secretRef": {"name": "k", "key": "k"}}}}}, "parameters": params}
	vault.fine with input as inp
	count(vault.violation) == 0 with input as inp
}

test_another_namespaces_path_is_denied if {
	some m in messages(agent(object.union(good, {"path": "team-b/openai"}), params))
	contains(m, `reads secret/data/team-b/openai, outside the paths that namespace "team-a" may read: [secret/data/team-a/]`)
}

test_api_form_and_slashes_read_the_same_path if {
	count(vault.violation) == 0 with input as agent(object.union(good, {"path": "/secret/data/team-a/openai/"}), params)
	some m in messages(agent(object.union(good, {"mount": "kv", "path": "kv/data/team-a/openai"}), params))
	contains(m, "reads kv/data/team-a/openai")
}

test_prefixes_match_whole_segments if {
	some m in messages(agent(object.union(good, {"path": "team-a-evil/openai"}), params))
	contains(m, "reads secret/data/team-a-evil/openai")
}

test_dot_segments_and_url_characters_are_denied if {
	every p in ["team-a/../team-b/openai", "team-a/./x", "team-a//x", "team-a/%2e%2e/x", "team-a/x?y", "team-a\\..\\x"] {
		some m in messages(agent(object.union(good, {"path": p}), {}))
		contains(m, "credentials.vault.path")
		contains(m, "is not a plain Vault path")
	}
}

test_role_address_auth_and_vault_namespace if {
	kv := object.union(good, {"address": "https://other:8200", "role": "team-b-agents", "auth": "jwt", "authMount": "jwt", "namespace": "tenants/team-b"})
	ms := messages(agent(kv, params))
	count(ms) == 5
	some m1 in ms
	contains(m1, `credentials.vault.role "team-b-agents" is not a Vault role that namespace "team-a" may log in as; use one of [team-a-agents]`)
	some m2 in ms
	contains(m2, `credentials.vault.auth "jwt" is not allowed`)
}

test_unset_fields_take_the_operators_defaults if {
	count(vault.violation) == 0 with input as agent({"path": "team-a/openai", "key": "k"}, params)
	count(vault.violation) == 0 with input as with_ledger(agent({"path": "team-a/openai", "key": "k"}, params), {})
}

test_unset_auth_is_kubernetes if {
	some m in messages(agent({"path": "team-a/openai", "key": "k"}, {"allowedAuthMethods": ["jwt"]}))
	contains(m, `auth "kubernetes" is not allowed`)
}

test_ledger_mount_and_role if {
	ms := messages(with_ledger(agent(good, params), {"mount": "db/../secret", "role": "ledger-team-b"}))
	count(ms) == 3
}

test_absent_parameters_switch_checks_off if {
	kv := object.union(good, {"address": "https://other:8200", "role": "r", "path": "anywhere/x"})
	count(vault.violation) == 0 with input as agent(kv, {})
}

test_empty_list_allows_nothing if {
	some m in messages(agent(good, {"allowedRoles": []}))
	contains(m, "use one of []")
}

test_job_template_is_checked if {
	inp := {"review": {"namespace": "team-a", "object": {"kind": "Job", "spec": {"template": {"credentials": {"vault": object.union(good, {"path": "team-b/x"})}}}}}, "parameters": params}
	some m in messages(inp)
	startswith(m, "spec.template.credentials.vault reads secret/data/team-b/x")
}

test_no_namespace_matches_no_namespace_value if {
	inp := {"review": {"namespace": "", "object": {"kind": "Agent", "metadata": {}, "spec": {"credentials": {"vault": {"path": "x", "key": "k"}}}}}, "parameters": {"allowedKvPathPrefixes": ["secret/data/{namespace}/"]}}
	count(vault.violation) == 1 with input as inp
}

test_malformed_parameters_are_named if {
	ms := messages(agent(good, {"allowedRoles": "team-a-agents", "allowedRole": ["x"], "allowedAuthMethods": ["approle"]}))
	count(ms) == 1
	some m in ms
	contains(m, "parameters are malformed")
	contains(m, "allowedRoles must be a list of strings")
	contains(m, `unknown parameter "allowedRole"`)
	contains(m, `allowedAuthMethods has "approle"`)
	not vault.params_typed with input as agent(good, {"allowedRoles": "x"})
	vault.params_typed with input as agent(good, params)
}

test_malformed_parameters_do_not_deny_objects_without_vault if {
	inp := {"review": {"namespace": "team-a", "object": {"kind": "Agent", "spec": {}}}, "parameters": {"allowedRoles": 5}}
	count(vault.violation) == 0 with input as inp
}
