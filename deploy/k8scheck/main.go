// Command k8scheck statically validates the tasklease Kubernetes manifests (deploy/k8s).
//
//	cd deploy/k8scheck && go run . [-json] ../k8s
//
// It reads DIR/kustomization.yaml, decodes every resource it lists strictly into its typed
// k8s.io/api object (an unknown, misspelled or mistyped field, a duplicate key or an unknown
// apiVersion/kind is an error; the SPIRE ClusterSPIFFEID CRD into the struct in
// clusterspiffeid.go, as strictly), and then checks the rules the broker's deployment must
// meet: non-root numeric user, read-only root filesystem, no privilege escalation, every
// capability dropped, seccomp RuntimeDefault, resources requested and limited, HTTPS liveness
// and readiness probes on /healthz and /readyz, at least two replicas spread over nodes, a
// NetworkPolicy denying by default, a PodDisruptionBudget that lets drains proceed, the
// Workload API from the SPIFFE CSI driver, no Secret with data, no secret in a ConfigMap or a
// literal environment variable, no :latest image, and selectors and ports that match across
// objects.
//
// Exit status: 0 when everything passes, 1 with one line per problem on stderr, 2 when DIR
// cannot be read. With -json it prints the decoded objects (as the Kubernetes types encode
// them) on stdout after a pass, for the Python tests to check settings against the broker.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
)

type jsonObject struct {
	File       string `json:"file"`
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Namespace  string `json:"namespace,omitempty"`
	Name       string `json:"name"`
	Object     any    `json:"object"`
}

func main() {
	asJSON := flag.Bool("json", false, "print the decoded objects as JSON on stdout after a pass")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: k8scheck [-json] DIR  (a directory with kustomization.yaml)")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	dir := flag.Arg(0)
	if info, err := os.Stat(dir); err != nil || !info.IsDir() {
		fmt.Fprintf(os.Stderr, "k8scheck: %s is not a readable directory\n", dir)
		os.Exit(2)
	}
	kustomization, objects, problems := loadDir(dir)
	if kustomization != nil && len(problems) == 0 {
		problems = check(kustomization, objects)
	}
	if len(problems) > 0 {
		for _, problem := range problems {
			fmt.Fprintf(os.Stderr, "k8scheck: %s\n", problem)
		}
		fmt.Fprintf(os.Stderr, "k8scheck: %s: %d problem(s)\n", dir, len(problems))
		os.Exit(1)
	}
	if *asJSON {
		out := make([]jsonObject, 0, len(objects))
		for _, o := range objects {
			out = append(out, jsonObject{
				File: o.File, APIVersion: o.GVK.GroupVersion().String(), Kind: o.GVK.Kind,
				Namespace: o.Meta.Namespace, Name: o.Meta.Name, Object: o.Value,
			})
		}
		encoder := json.NewEncoder(os.Stdout)
		encoder.SetIndent("", "  ")
		if err := encoder.Encode(map[string]any{"objects": out}); err != nil {
			fmt.Fprintf(os.Stderr, "k8scheck: %v\n", err)
			os.Exit(2)
		}
	}
	fmt.Fprintf(os.Stderr, "k8scheck: %s: %d objects in %d files, all checks passed\n",
		dir, len(objects), len(kustomization.Resources))
}
