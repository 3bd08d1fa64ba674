{{/*
The chart name, overridable with nameOverride.
*/}}
{{- define "breakwater.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource-name prefix: fullnameOverride, else the release name when it already contains the
chart name (release "breakwater" gives "breakwater-operator", as in manifests/), else
"<release>-<chart>". Truncated to 63 characters, the DNS label limit.
*/}}
{{- define "breakwater.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the operator's objects (Deployment, Service, PDB, ClusterRole, ...).
*/}}
{{- define "breakwater.operator.fullname" -}}
{{- printf "%s-operator" (include "breakwater.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the sidecar Role and RoleBinding in each application namespace.
*/}}
{{- define "breakwater.sidecar.fullname" -}}
{{- printf "%s-sidecar" (include "breakwater.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The Secret holding the webhook's serving certificate (tls.crt, tls.key, and ca.crt).
*/}}
{{- define "breakwater.webhook.secretName" -}}
{{- printf "%s-webhook-tls" (include "breakwater.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "breakwater.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "breakwater.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Chart label value: name-version, with "+" (not allowed in label values) replaced.
*/}}
{{- define "breakwater.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "breakwater.labels" -}}
helm.sh/chart: {{ include "breakwater.chart" . }}
{{ include "breakwater.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: breakwater
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (immutable on a Deployment: never add to them in an upgrade).
*/}}
{{- define "breakwater.selectorLabels" -}}
app.kubernetes.io/name: {{ include "breakwater.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of the operator's objects, and the selector of its pods.
*/}}
{{- define "breakwater.operator.labels" -}}
{{ include "breakwater.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "breakwater.operator.selectorLabels" -}}
{{ include "breakwater.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The image reference: repository:tag, the tag defaulting to the chart's appVersion (the crate
version, as in manifests/).
*/}}
{{- define "breakwater.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
The namespace of one sidecarRbac.namespaces entry: a plain name, or a map with `namespace`.
*/}}
{{- define "breakwater.sidecarEntry.namespace" -}}
{{- if kindIs "string" . }}
{{- . }}
{{- else }}
{{- required "each sidecarRbac.namespaces entry is a namespace name or {namespace, serviceAccountName}" .namespace }}
{{- end }}
{{- end }}
