package main

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// ClusterSPIFFEIDKind is the SPIRE Controller Manager's CRD (cluster-scoped). Kubernetes
// ships no Go type for it, so these structs mirror the spec fields of
// github.com/spiffe/spire-controller-manager api/v1alpha1 (ClusterSPIFFEIDSpec), with the same
// JSON names, and are decoded as strictly as the built-in types: an unknown or misspelled
// field is an error. Status is written by the controller, never by a manifest: not accepted.
var ClusterSPIFFEIDKind = schema.GroupVersionKind{
	Group: "spire.spiffe.io", Version: "v1alpha1", Kind: "ClusterSPIFFEID",
}

// ClusterSPIFFEID registers the workloads its selectors match with SPIRE.
type ClusterSPIFFEID struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`

	Spec ClusterSPIFFEIDSpec `json:"spec"`
}

// ClusterSPIFFEIDSpec is the desired registration.
type ClusterSPIFFEIDSpec struct {
	SPIFFEIDTemplate          string                `json:"spiffeIDTemplate"`
	TTL                       *metav1.Duration      `json:"ttl,omitempty"`
	JWTTTL                    *metav1.Duration      `json:"jwtTtl,omitempty"`
	DNSNameTemplates          []string              `json:"dnsNameTemplates,omitempty"`
	WorkloadSelectorTemplates []string              `json:"workloadSelectorTemplates,omitempty"`
	FederatesWith             []string              `json:"federatesWith,omitempty"`
	NamespaceSelector         *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
	PodSelector               *metav1.LabelSelector `json:"podSelector,omitempty"`
	Admin                     bool                  `json:"admin,omitempty"`
	Downstream                bool                  `json:"downstream,omitempty"`
	AutoPopulateDNSNames      bool                  `json:"autoPopulateDNSNames,omitempty"`
	ClassName                 string                `json:"className,omitempty"`
	Fallback                  bool                  `json:"fallback,omitempty"`
	Hint                      string                `json:"hint,omitempty"`
}
